"""The lesion segmenter and its refiner (UNet), which every ultrasound family reads its ROI from."""
