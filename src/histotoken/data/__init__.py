"""Data: BreakHis index, patient-disjoint splits, synthetic generator, transforms, datasets."""
