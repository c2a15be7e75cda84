"""Write the regression anchor of tests/golden/test_shipped_flux.py after exporting a new flow-matching reference."""

import torch

import taylorseer
from taylorseer.models.checkpoint import manifest_sha256, save_tensors
from taylorseer.models.flux_pipeline import FLUX_FILE, load_flux_reference

if __name__ == "__main__":
    torch.set_num_threads(1)
    ref = load_flux_reference()
    labels = torch.tensor([1, 7])
    full = ref.generate(labels, num_steps=28, seed=1234)
    with taylorseer.apply(ref.pipe, taylorseer.preset("paper_flux")):
        cached = ref.generate(labels, num_steps=28, seed=1234)
    save_tensors("tests/golden/shipped_flux_sample.safetensors", {"full": full, "paper_flux": cached},
                 {"checkpoint_sha256": manifest_sha256(FLUX_FILE), "labels": "1,7", "seed": "1234",
                  "num_steps": "28", "guidance_scale": str(ref.call_arguments(labels)["true_cfg_scale"]),
                  "sampler": "FluxPipeline, FlowMatchEulerDiscreteScheduler (FLUX.1-dev config), true CFG"})
    print("wrote tests/golden/shipped_flux_sample.safetensors")
