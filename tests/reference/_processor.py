"""Helpers the reference checks share."""
import sys


def check_processor(folder, ref, pixels):
    """The folder's AutoImageProcessor turns ref["raw_pixels"] (uint8 NHWC) into `pixels` (the
    pixel values Kindling's eval view made of them) to 1e-5; exits 1 otherwise."""
    import json

    import numpy as np
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(folder)
    raw = [np.array(im, dtype=np.uint8) for im in ref["raw_pixels"]]
    got = processor(images=raw, return_tensors="pt", input_data_format="channels_last").pixel_values
    d = (got - pixels).abs().max().item()
    print(json.dumps({"processor": type(processor).__name__, "pixel_max_abs_diff": d}))
    if d > 1e-5:
        print(f"the image processor's pixels differ by {d}")
        sys.exit(1)
