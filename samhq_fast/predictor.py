class SamHQPredictor: pass
