"""Data: the sample record, image I/O (PNG/JPEG/DICOM/JSRT), source readers, transforms, splits, samplers, prepared caches."""
