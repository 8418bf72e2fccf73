import math

import pytest
import torch

from minigpt import GPTConfig, MiniGPT
from minigpt.kernels import causal_attention


def reference_attention(q, k, v):
    """Float64 attention written out longhand, queries aligned to the end of the keys."""
    q, k, v = q.double(), k.double(), v.double()
    tq, tk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("tq,tk", [(7, 7), (1, 9), (5, 37), (1, 1)])
def test_causal_attention_matches_reference_with_offset(tq, tk):
    torch.manual_seed(tq * 100 + tk)
    q = torch.randn(2, 3, tq, 16)
    k, v = torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    out = causal_attention(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_causal_attention_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))


def test_changing_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=11, block_size=12, embed_dim=24, num_heads=3, num_layers=2)).eval()
    idx = torch.randint(0, 11, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 11
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_lm_head_is_tied_to_token_embedding():
    model = MiniGPT(GPTConfig(vocab_size=20, block_size=8, embed_dim=16, num_heads=2, num_layers=1))
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    vocab, block, embed, layers = 20, 8, 16, 1
    per_layer = (2 * embed  # ln_attn
                 + 3 * embed * embed + 3 * embed + embed * embed + embed  # qkv, proj
                 + 2 * embed  # ln_mlp
                 + 4 * embed * embed + 4 * embed + 4 * embed * embed + embed)  # fc, proj
    expected = vocab * embed + block * embed + layers * per_layer + 2 * embed  # the tied head adds nothing
    assert model.num_parameters() == expected


def test_sequence_longer_than_block_is_refused():
    model = MiniGPT(GPTConfig(vocab_size=5, block_size=4, embed_dim=8, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="exceed block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_tiny_model_overfits_a_short_text():
    from minigpt import CharTokenizer

    text = "hello minigpt, hello attention. " * 4
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, embed_dim=32, num_heads=2,
                              num_layers=2))
    x, y = ids[:32][None], ids[1:33][None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, first_loss = model(x, y)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first_loss.item() > 2.0
    assert loss.item() < 0.1 * first_loss.item()
