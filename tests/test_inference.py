"""sparse_inference: outputs against the dense masked model, the paths chosen, bad input refused.

Tolerance: fp32 outputs equal the dense masked model's to rtol/atol 1e-5 (the same products
summed in another order); bf16 (CUDA only) to 2e-2.
"""

import copy

import pytest
import torch
from torch import nn

from obs_compress import InvalidArgument, sparse_inference
from obs_compress import inference
from obs_compress.inference import CPU_CSR_MAX_DENSITY, SparseLinear
from obs_compress.model.blocks import find_block_stack, find_layers
from obs_compress_kernels import bitmask_weight

from _tiny_models import tiny_model

FP32 = dict(rtol=1e-5, atol=1e-5)


def _block_layers(model):
    stack = find_block_stack(model)
    return [layer for index, block in enumerate(stack.modules)
            for layer in find_layers(block, stack.block_name(index))]


@torch.no_grad()
def _prune_(model, sparsity, seed=0):
    """Zero a random ``sparsity`` fraction of every block Linear; returns the kept masks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in _block_layers(model):
        kept = torch.rand(layer.module.weight.shape, generator=g) >= sparsity
        layer.module.weight.mul_(kept)
        masks[layer.name] = kept if not layer.transposed else kept.T
    return masks


def _decode_logits(model, batch, steps=4):
    """Logits of a 5-token prompt and then ``steps`` one-token calls through the KV cache."""
    ids = torch.randint(4, 128, (batch, 5), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits = [out.logits]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def test_llama_at_70_percent_runs_csr_and_equals_the_dense_masked_model():
    dense = tiny_model("llama")
    _prune_(dense, 0.7)
    sparse = copy.deepcopy(dense)
    report = sparse_inference(sparse, policy="always")  # auto keeps a model this small dense
    assert len(report.layers) == 14 and len(report.swapped) == 14
    assert {(layer.decode, layer.prefill) for layer in report.layers} == {("csr", "densified")}
    assert all(layer.weight_bytes < 0.7 * layer.dense_bytes for layer in report.layers)
    assert isinstance(sparse.model.layers[1].mlp.down_proj, SparseLinear)
    assert not any(isinstance(m, nn.Linear) for m in sparse.model.layers.modules())
    assert isinstance(sparse.lm_head, nn.Linear)  # embeddings and lm_head untouched
    for batch in (1, 3, 8):  # 8 prompt rows x 5 tokens = 40 > 8: prefill takes the dense product
        torch.testing.assert_close(_decode_logits(sparse, batch), _decode_logits(dense, batch), **FP32)
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(sparse.generate(prompt, max_new_tokens=12, do_sample=False),
                       dense.generate(prompt, max_new_tokens=12, do_sample=False))
    table = report.table()
    assert "model.layers.1.mlp.down_proj" in table and "14 of 14 layers swapped" in table


def test_rule_keeps_dense_above_the_density_limit_and_always_overrides_it(monkeypatch):
    model = tiny_model("llama")
    _prune_(model, 0.3)  # density ~0.7 > CPU_CSR_MAX_DENSITY
    before = {layer.name: layer.module for layer in _block_layers(model)}
    report = sparse_inference(model)  # a 0.1 MiB stack: cache-resident
    assert not report.swapped
    assert all("MiB < 64 MiB stay in cache" in layer.reason for layer in report.layers)
    monkeypatch.setattr(inference, "CPU_CSR_MIN_STACK_BYTES", 0)  # as if the model were large
    report = sparse_inference(model)
    assert not report.swapped
    assert all(f"> {CPU_CSR_MAX_DENSITY}" in layer.reason for layer in report.layers)
    assert {layer.name: layer.module for layer in _block_layers(model)} == before
    dense = copy.deepcopy(model)
    report = sparse_inference(model, policy="always")
    assert len(report.swapped) == 14 and report.layers[0].reason == "policy always"
    torch.testing.assert_close(_decode_logits(model, 2), _decode_logits(dense, 2), **FP32)


def test_unpruned_layers_are_reported_and_left_alone():
    llama = tiny_model("llama")
    report = sparse_inference(llama)
    assert {layer.reason for layer in report.layers} == {"not pruned"} and not report.swapped


def test_gpt2_conv1d_layers_swap_with_their_transposed_weight():
    dense = tiny_model("gpt2")
    masks = _prune_(dense, 0.7)  # (d_out, d_in) masks, the transpose of Conv1D's storage
    sparse = copy.deepcopy(dense)
    report = sparse_inference(sparse, masks=masks, policy="always")
    assert len(report.swapped) == len(report.layers) == 8
    attention = sparse.transformer.h[0].attn.c_attn
    assert isinstance(attention, SparseLinear) and (attention.out_features, attention.in_features) == (192, 64)
    assert attention.dense_weight().numpy().tobytes() == torch.where(
        masks["transformer.h.0.attn.c_attn"], dense.transformer.h[0].attn.c_attn.weight.detach().T, 0.0
    ).contiguous().numpy().tobytes()
    for batch in (1, 2):
        torch.testing.assert_close(_decode_logits(sparse, batch), _decode_logits(dense, batch), **FP32)


def test_bert_with_biases_and_explicit_masks(monkeypatch):
    dense = tiny_model("bert")
    masks = _prune_(dense, 0.6)
    sparse = copy.deepcopy(dense)
    monkeypatch.setattr(inference, "CPU_CSR_MIN_STACK_BYTES", 0)
    report = sparse_inference(sparse, masks=masks)
    assert len(report.swapped) == len(report.layers) == 12
    assert all("rule: density" in layer.reason and "<= 0.5" in layer.reason for layer in report.layers)
    # The stored entries are the masks' True entries, zeros among them included.
    query = sparse.encoder.layer[0].attention.self.query
    assert query.decode_weight.values().numel() == int(masks["encoder.layer.0.attention.self.query"].sum())
    ids = torch.randint(4, 128, (2, 3), generator=torch.Generator().manual_seed(0))  # 6 tokens: decode
    for tokens in (ids, ids.repeat(1, 7)):  # and 42 tokens: prefill
        with torch.no_grad():
            torch.testing.assert_close(sparse(tokens).last_hidden_state,
                                       dense(tokens).last_hidden_state, **FP32)


def test_bitmask_decode_layer_on_cpu_equals_dense():
    # The CUDA decode layout, driven through its torch path on CPU.
    g = torch.Generator().manual_seed(0)
    # torch.where, not a product: a product leaves -0.0 at negative pruned entries, which the
    # sparse layouts (storing kept entries only) give back as +0.0.
    weight = torch.where(torch.rand(10, 37, generator=g) > 0.6, torch.randn(10, 37, generator=g), 0.0)
    bias = torch.randn(10, generator=g)
    layer = SparseLinear("bitmask", bitmask_weight(weight), bias, (10, 37), decode_max_tokens=4)
    for tokens in (1, 4, 9):
        x = torch.randn(tokens, 37, generator=g)
        torch.testing.assert_close(layer(x), x @ weight.T + bias, **FP32)
    assert layer.dense_weight().numpy().tobytes() == weight.numpy().tobytes()


def test_bad_arguments_are_refused_with_the_field_named():
    model = tiny_model("llama")
    masks = _prune_(model, 0.7)
    with pytest.raises(InvalidArgument, match="policy must be one of"):
        sparse_inference(model, policy="fast")
    with pytest.raises(InvalidArgument, match="decode_max_tokens"):
        sparse_inference(model, decode_max_tokens=0)
    with pytest.raises(InvalidArgument, match="not prunable Linears.*lm_head"):
        sparse_inference(model, masks={"lm_head": torch.ones(128, 64, dtype=torch.bool)})
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(InvalidArgument, match=f"masks\\['{name}'\\] must be bool of shape"):
        sparse_inference(model, masks={name: masks[name].float()})
    wrong = masks[name].clone()
    wrong[masks[name]] = False  # claims every kept weight is pruned
    with pytest.raises(InvalidArgument, match="nonzero entries where"):
        sparse_inference(model, masks={name: wrong})
    with torch.device("meta"):
        offloaded = tiny_model("llama")
    with pytest.raises(InvalidArgument, match="on the meta device"):
        sparse_inference(offloaded)
    sparse_inference(model, policy="always")
    with pytest.raises(InvalidArgument, match="already runs sparse inference"):
        sparse_inference(model)
    with pytest.raises(InvalidArgument, match="move and cast the model before sparse_inference"):
        model.model.layers[0].mlp.up_proj(torch.zeros(1, 64, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["auto", "always"])
def test_cuda_bf16_probe_and_outputs(policy):
    dense = tiny_model("llama").to("cuda", torch.bfloat16)
    _prune_(dense, 0.7)
    sparse = copy.deepcopy(dense)
    report = sparse_inference(sparse, policy=policy)
    assert report.device == "cuda"
    if policy == "always":
        assert {layer.decode for layer in report.layers} == {"bitmask"}
    else:
        assert all("probe:" in layer.reason for layer in report.layers)
    torch.testing.assert_close(_decode_logits(sparse, 2).float(), _decode_logits(dense, 2).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_smollm2_at_70_percent_matches_the_dense_masked_model(smollm2_path):
    """The real model through the rule: every block Linear on CSR; logits through prefill and
    KV-cache decode within 1e-4 of their scale, and the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    from obs_compress import oneshot

    dense = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    oneshot(dense, {"method": "magnitude", "sparsity": 0.7, "calibration": {"source": "none"}},
            progress=False)
    sparse = copy.deepcopy(dense)
    report = sparse_inference(sparse)
    assert len(report.swapped) == len(report.layers) == 210
    assert {layer.decode for layer in report.layers} == {"csr"}
    for batch in (1, 8):
        sparse_logits, dense_logits = _decode_logits(sparse, batch), _decode_logits(dense, batch)
        # Reordered fp32 sums through 30 blocks: measured 1.4e-5 of the largest logit at batch 1
        # (4.6e-4 absolute), so the bound is relative to the logits' scale, not per element.
        error = float((sparse_logits - dense_logits).abs().max() / dense_logits.abs().max())
        print(f"batch {batch}: max |difference| / max |logit| = {error:.2e}")
        assert error <= 1e-4
        assert torch.equal(sparse_logits.argmax(-1), dense_logits.argmax(-1))


def test_load_pretrained_with_sparse_inference_equals_the_plain_load(tmp_path):
    import obs_compress

    model = tiny_model("llama")
    _prune_(model, 0.6)
    out = obs_compress.save_pretrained(model, tmp_path / "pruned")
    plain = obs_compress.load_pretrained(out)
    assert plain.sparse_inference is None
    loaded = obs_compress.load_pretrained(out, sparse_inference=True, sparse_policy="always",
                                          device="cpu")
    report = loaded.sparse_inference
    assert len(report.swapped) == 14 and report.device == "cpu"
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, SparseLinear)
    for batch in (1, 4):
        torch.testing.assert_close(_decode_logits(loaded.model, batch),
                                   _decode_logits(plain.model, batch), **FP32)
    auto = obs_compress.load_pretrained(out, sparse_inference=True)  # a cache-resident stack
    assert auto.sparse_inference.policy == "auto" and not auto.sparse_inference.swapped
    with pytest.raises(InvalidArgument, match="sparse_inference must be True or False"):
        obs_compress.load_pretrained(out, sparse_inference="yes")
    with pytest.raises(InvalidArgument, match="policy must be one of"):
        obs_compress.load_pretrained(out, sparse_inference=True, sparse_policy="fast")
