"""Steps 1-2: images in, clean cropped images out (never in place)."""
