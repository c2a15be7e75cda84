"""Write the regression anchor of tests/golden/test_shipped.py after exporting a new reference checkpoint."""

import torch

from taylorseer.models.checkpoint import manifest_sha256, save_tensors
from taylorseer.models.pretrained import REFERENCE_FILE, load_reference
from taylorseer.models.sampler import sample

if __name__ == "__main__":
    torch.set_num_threads(1)
    images = sample(load_reference(), torch.tensor([1, 7]), num_steps=50, seed=1234)
    save_tensors("tests/golden/shipped_sample.safetensors", {"images": images},
                 {"checkpoint_sha256": manifest_sha256(REFERENCE_FILE), "labels": "1,7", "seed": "1234",
                  "num_steps": "50", "guidance_scale": "1.5",
                  "sampler": "DDIM leading, eta 0, x0 not clipped, CFG at every step"})
    print("wrote tests/golden/shipped_sample.safetensors")
