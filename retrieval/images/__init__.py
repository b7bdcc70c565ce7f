"""Image files: finding them in a folder, decoding them safely (Pillow, or nvJPEG on the device), decoding in worker processes."""
