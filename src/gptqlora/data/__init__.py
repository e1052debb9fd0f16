"""GSM8K data: loading, prompts, the training dataset and calibration samples."""
