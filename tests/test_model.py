import pytest
import torch
import torch.nn.functional as F

from losslab.losses import build_loss
from losslab.model import GPT, GPTConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=101, context_length=16, n_layer=2, n_head=2, n_embd=32))


def test_forward_gives_logits_and_the_mean_loss(model):
    ids = torch.randint(0, 101, (3, 16))
    targets = torch.randint(0, 101, (3, 16))
    targets[0, :4] = -100
    logits, loss = model(ids, targets)
    assert logits.shape == (3, 16, 101)
    expected = F.cross_entropy(logits.reshape(-1, 101), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert model(ids)[1] is None


def test_hidden_states_times_the_tied_head_are_the_logits(model):
    ids = torch.randint(0, 101, (2, 9))
    assert model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.hidden_states(ids) @ model.lm_head.weight.T, model(ids)[0])


def test_attention_is_causal(model):
    ids = torch.randint(0, 101, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 101
    torch.testing.assert_close(model(ids)[0][:, :8], model(changed)[0][:, :8])


def test_gpt2_initialisation_and_size():
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768))
    assert gpt2.num_parameters(non_embedding=False) == 124_439_808  # GPT-2 small
    assert gpt2.wte.weight.std().item() == pytest.approx(0.02, rel=0.01)
    residual_std = gpt2.blocks[0].attn.proj.weight.std().item()
    assert residual_std == pytest.approx(0.02 / (2 * 12) ** 0.5, rel=0.02)
    assert gpt2.blocks[0].mlp.fc.bias.abs().max() == 0


def test_too_long_sequence_is_a_clear_error(model):
    with pytest.raises(ValueError, match="sequence length 17 is longer than the model's context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(n_layer=0), "n_layer=0: must be an int >= 1"),
        (dict(n_embd=130), r"n_embd=130 is not a multiple of n_head=4: .*\(e.g. n_embd=128\)"),
        (dict(dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
    ],
)
def test_a_shape_that_cannot_work_is_refused_in_one_place(options, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(vocab_size=11, **options)


def test_generate_extends_and_greedy_is_deterministic(model):
    ids = torch.randint(0, 101, (2, 20))  # longer than the context: generation crops it
    first = model.generate(ids, 5, temperature=0)
    assert first.shape == (2, 25)
    torch.testing.assert_close(first, model.generate(ids, 5, temperature=0))
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(ids, 5, temperature=1.0, top_k=3, generator=g)
    assert sampled.shape == (2, 25) and sampled.max() < 101


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-320, 5e-324])
def test_a_near_zero_temperature_samples_as_greedy_without_nan(model, temperature):
    # dividing the logits by it gave inf (float32 overflows above 3.4e38, and holds no 1e-320), then nan
    ids = torch.randint(0, 101, (2, 4))
    g = torch.Generator().manual_seed(1)
    greedy = model.generate(ids, 6, temperature=0)
    torch.testing.assert_close(model.generate(ids, 6, temperature=temperature, top_k=5, generator=g), greedy)


def test_a_bias_in_the_lm_head_reaches_the_logits_and_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, context_length=16, n_layer=1, n_head=2, n_embd=32, lm_head_bias=True))
    with torch.no_grad():
        model.lm_head.bias.normal_()
    assert model.lm_head.weight is model.wte.weight and model.lm_head.bias.shape == (101,)
    ids, targets = torch.randint(0, 101, (2, 9)), torch.randint(0, 101, (2, 9))
    hidden = model.hidden_states(ids)
    logits, loss = model(ids, targets)
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T + model.lm_head.bias)
    fused = build_loss("fused")(hidden, model.lm_head.weight, targets, model.lm_head.bias)
    torch.testing.assert_close(fused, loss)
    fused.backward()
    assert model.lm_head.bias.grad is not None and model.lm_head.bias.grad.abs().sum() > 0
