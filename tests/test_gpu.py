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


def test_cuda_capture_matches_the_models_routing_across_reused_buffers(tiny_model):
    """The side-stream copies into pinned memory deliver exactly what the model computed, batch after batch."""
    from transformers import AutoModelForCausalLM

    from collection.capture import RoutingCapture, pad_batch
    from collection.model import moe_blocks, routing_shape

    dev = torch.device("cuda", 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(dev).eval()
    s = routing_shape(model)
    L, K, H = s.num_layers, s.top_k, s.hidden_size
    moe_inputs = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a, l=l: moe_inputs.__setitem__(l, a[0].detach().clone()))
             for l, (_, mlp) in enumerate(moe_blocks(model))]
    cap = RoutingCapture(model, list(range(L)), torch.float32, True, 64, K, s.norm_topk_prob, s.num_experts, H)
    g = torch.Generator().manual_seed(0)
    for lengths in [(9, 4, 13), (16, 16), (5, 12, 3)]:  # 3 batches on 2 alternating pinned buffers
        ids, mask = pad_batch([torch.randint(1, 500, (n,), generator=g).tolist() for n in lengths], 0)
        hb = cap.forward(model, ids, mask, output_router_logits=True)
        hb.ready.synchronize()
        real = mask.reshape(-1).bool().to(dev)
        for l in range(L):
            logits = cap.last_output.router_logits[l][real].float()
            assert torch.equal(hb.topk_ids[l, :hb.rows].long(), logits.topk(K, -1).indices.cpu())
            assert torch.allclose(hb.router_logits[l, :hb.rows].float(), logits.cpu(), atol=2e-3, rtol=1e-3)
            assert torch.equal(hb.hidden[l, :hb.rows], moe_inputs[l].reshape(-1, H)[real].cpu())
        cap.release(hb)
    cap.close()
    for h in hooks:
        h.remove()
