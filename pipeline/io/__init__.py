"""Reading scans and writing masks: NIfTI, DICOM series and other ITK formats."""
