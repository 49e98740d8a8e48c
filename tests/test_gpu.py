"""GPU-only checks (skipped on CPU machines such as CI): 4-bit loading really quantizes the experts."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_4bit_quantizes_routed_experts_and_keeps_routing_sane(tiny_model):
    from collection.model import load_model, moe_blocks
    from collection.quantize import quantized_bytes

    dev = torch.device("cuda", 0)
    model, tok = load_model(str(tiny_model), dev, torch.float16, "4bit")
    for _, mlp in moe_blocks(model):
        assert "gate_up_proj" not in dict(mlp.experts.named_parameters())  # no 16-bit copy left
        assert mlp.experts.gate_up_proj_nf4.dtype == torch.uint8
    groups = quantized_bytes(model)
    assert groups["routed_experts_nf4"] > 0
    x = torch.randint(0, 400, (2, 16), device=dev)
    out = model(input_ids=x, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
