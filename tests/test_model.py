"""Networks and support transforms against EZ_SPEC §2."""

import pytest
import torch

from model import (DepthBatchNorm, NetworkOutput, inverse_scalar_transform, make_model, scalar_to_support,
                   scalar_transform, support_to_scalar)


# ---------------------------------------------------------------------------------------------
# Transforms (EZ_SPEC §2.5)
# ---------------------------------------------------------------------------------------------

def test_h_and_inverse_are_inverses_over_a_wide_range():
    mags = torch.logspace(-6, 5, 2001, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(inverse_scalar_transform(scalar_transform(x)), x, rtol=1e-7, atol=1e-12)
    y = torch.linspace(-300, 300, 6001, dtype=torch.float64)
    torch.testing.assert_close(scalar_transform(inverse_scalar_transform(y)), y, rtol=1e-9, atol=1e-9)


def test_h_known_values():
    # h(3) = sqrt(4) - 1 + 0.003 = 1.003; h(-8) = -(3 - 1) - 0.008 = -2.008; h(0) = 0
    x = torch.tensor([3.0, -8.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(scalar_transform(x), torch.tensor([1.003, -2.008, 0.0], dtype=torch.float64))


def test_two_hot_expectation_is_the_scalar():
    S = 300
    x = torch.tensor([0.0, 1.0, -1.0, 0.37, 5.5, -17.25, 123.4, 3000.0, -25000.0], dtype=torch.float64)
    target = scalar_to_support(x, S)                                  # [9, 601]
    assert target.shape == (9, 2 * S + 1)
    torch.testing.assert_close(target.sum(-1), torch.ones(9, dtype=torch.float64))
    assert ((target > 0).sum(-1) <= 2).all()                          # two-hot
    support = torch.arange(-S, S + 1, dtype=torch.float64)
    expectation = (target * support).sum(-1)                          # in h-space
    torch.testing.assert_close(inverse_scalar_transform(expectation), x, rtol=1e-9, atol=1e-9)
    # support_to_scalar of log-probabilities recovers the scalar too (softmax(log p) = p)
    torch.testing.assert_close(support_to_scalar(torch.log(target.clamp_min(1e-300)), S), x, rtol=1e-6, atol=1e-6)


def test_two_hot_bins():
    # h(x) = 2.25 exactly for x with sqrt(|x|+1) - 1 + 0.001 x = 2.25; test in h-space via the inverse
    x = inverse_scalar_transform(torch.tensor([2.25, -0.5], dtype=torch.float64))
    t = scalar_to_support(x, 5)                                       # support [-5, 5], index = y + 5
    torch.testing.assert_close(t[0, 7], torch.tensor(0.75, dtype=torch.float64))
    torch.testing.assert_close(t[0, 8], torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(t[1, 4], torch.tensor(0.5, dtype=torch.float64))  # floor(-0.5) = -1
    torch.testing.assert_close(t[1, 5], torch.tensor(0.5, dtype=torch.float64))


def test_values_outside_the_support_clamp():
    S = 10                                                            # h(x) = 10 near x = 119
    t = scalar_to_support(torch.tensor([1e6, -1e6, 119.0]), S)
    assert t[0, -1] == 1 and t[0].sum() == 1
    assert t[1, 0] == 1 and t[1].sum() == 1
    assert t[2, -2:].sum() == pytest.approx(1.0)


def test_support_to_scalar_zeroes_tiny_values():
    logits = torch.zeros(2, 21)                                       # uniform: expectation 0
    assert torch.equal(support_to_scalar(logits, 10), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# Networks (EZ_SPEC §2)
# ---------------------------------------------------------------------------------------------

def conv(c_in, c_out, k=3, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c):
    return 2 * c                                                      # weight + bias (running stats are buffers)


def linear(i, o):
    return i * o + o


def resblock(c_in, c_out, shortcut=0):
    return conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out) + bn(c_out) + shortcut


def expected_counts(A, S=601, H=512):
    """Counted from EZ_SPEC §2's layer list (64 channels, 16 reduced, fc 32, LSTM 576 -> H)."""
    representation = (conv(12, 32) + bn(32) + resblock(32, 32) + resblock(32, 64, shortcut=conv(32, 64))
                      + 3 * resblock(64, 64))                          # res3, res4, blocks=1
    lstm = 4 * H * (576 + H) + 2 * 4 * H                               # W_ih, W_hh, b_ih, b_hh
    dynamics = (conv(65, 64) + bn(64) + resblock(64, 64) + conv(64, 16, 1, bias=True) + bn(16) + lstm + bn(H)
                + linear(H, 32) + bn(32) + linear(32, S))
    head = conv(64, 16, 1, bias=True) + bn(16) + linear(576, 32) + bn(32)
    prediction = resblock(64, 64) + head + linear(32, S) + head + linear(32, A)
    projection = linear(2304, 1024) + bn(1024) + linear(1024, 1024) + bn(1024) + linear(1024, 1024) + bn(1024)
    projection_head = linear(1024, 512) + bn(512) + linear(512, 1024)
    return dict(representation=representation, dynamics=dynamics, prediction=prediction,
                projection=projection, projection_head=projection_head)


@pytest.mark.parametrize("A", [4, 18])
def test_parameter_counts_match_the_layer_list(A):
    model = make_model((12, 96, 96), A)
    expected = expected_counts(A)
    for name, count in expected.items():
        actual = sum(p.numel() for p in getattr(model, name).parameters())
        print(f"A={A} {name:16s} {actual:>10,d}")
        assert actual == count, name
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(expected.values())                            # no unused modules
    if A == 4:
        assert expected["dynamics"] == 2_382_281                      # EZ_SPEC Appendix B.4
        assert round(total / 1e6, 2) == 8.35


@pytest.fixture(scope="module")
def atari_net():
    torch.manual_seed(0)
    return make_model((12, 96, 96), 9).eval()


@pytest.mark.parametrize("B", [1, 7])
def test_atari_output_shapes(atari_net, B):
    obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = atari_net.initial_inference(obs)
        assert isinstance(out, NetworkOutput)
        assert out.latent.shape == (B, 64, 6, 6)
        assert out.lstm_state[0].shape == out.lstm_state[1].shape == (B, 512)
        assert out.value.shape == out.value_prefix.shape == (B,)
        assert out.policy_logits.shape == (B, 9) and out.value_logits.shape == (B, 601)
        assert out.value_prefix_logits is None
        rec = atari_net.recurrent_inference(out.latent, out.lstm_state, torch.arange(B) % 9, 1)
        assert rec.latent.shape == (B, 64, 6, 6)
        assert rec.value_prefix_logits.shape == rec.value_logits.shape == (B, 601)
        assert rec.value.shape == rec.value_prefix.shape == (B,)
        assert atari_net.project(rec.latent, with_predictor=True).shape == (B, 1024)
        assert atari_net.project(rec.latent, with_predictor=False).shape == (B, 1024)


def test_at_init_policy_uniform_value_and_prefix_zero(atari_net):
    obs = torch.randint(0, 256, (5, 12, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = atari_net.initial_inference(obs)
        rec = atari_net.recurrent_inference(out.latent, out.lstm_state, torch.tensor([0, 3, 8, 1, 2]), 1)
    for o in (out, rec):
        torch.testing.assert_close(torch.softmax(o.policy_logits, -1), torch.full((5, 9), 1 / 9))
        assert torch.equal(o.value, torch.zeros(5))
        assert torch.equal(o.value_prefix, torch.zeros(5))


def test_uint8_and_float_observations_agree(atari_net):
    obs = torch.randint(0, 256, (2, 12, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        a = atari_net.initial_inference(obs).latent
        b = atari_net.initial_inference(obs.float() / 255).latent
    torch.testing.assert_close(a, b)


def test_action_enters_as_a_constant_plane(atari_net):
    # Same state, different actions -> different next states; the plane is a / |A| (not one-hot).
    torch.manual_seed(1)
    s = torch.randn(2, 64, 6, 6)
    zeros = (torch.zeros(2, 512), torch.zeros(2, 512))
    with torch.no_grad():
        n0 = atari_net.recurrent_inference(s, zeros, torch.tensor([0, 0]), 1).latent
        n5 = atari_net.recurrent_inference(s, zeros, torch.tensor([5, 5]), 1).latent
        dyn = atari_net.dynamics
        plane = torch.full((2, 1, 6, 6), 5 / 9)
        manual = dyn.res(torch.relu(dyn.bn(dyn.conv(torch.cat([s, plane], 1)), 1) + s), 1)
    assert not torch.allclose(n0, n5)
    torch.testing.assert_close(n5, manual)


def test_lstm_state_threads_through_recurrent_inference():
    torch.manual_seed(0)
    net = make_model((12, 96, 96), 4, lstm_hidden=32).eval()
    torch.nn.init.normal_(net.dynamics.fc[-1].weight)                 # make the prefix depend on the LSTM
    obs = torch.randint(0, 256, (3, 12, 96, 96), dtype=torch.uint8)
    a = torch.tensor([1, 2, 3])
    with torch.no_grad():
        root = net.initial_inference(obs)
        step1 = net.recurrent_inference(root.latent, root.lstm_state, a, 1)
        assert not torch.equal(step1.lstm_state[0], root.lstm_state[0])
        # The threaded state changes the next prefix; a fresh (zero) state gives another one
        step2 = net.recurrent_inference(step1.latent, step1.lstm_state, a, 2)
        fresh = net.recurrent_inference(step1.latent, root.lstm_state, a, 2)
        assert not torch.allclose(step2.value_prefix_logits, fresh.value_prefix_logits)
        torch.testing.assert_close(step2.latent, fresh.latent)        # the state path has no LSTM


def test_recurrent_inference_without_scalars_gives_the_same_logits():
    """The learner's unroll asks for logits only (scalars=False): the same latent, LSTM state and logits as a
    full call in train mode, and no scalars (a wrong branch would show as a difference or as a tensor)."""
    import copy
    torch.manual_seed(0)
    net = make_model((4,), 2, hidden=32, latent_dim=16, lstm_hidden=8, support_size=10, state_norm=True).train()
    twin = copy.deepcopy(net)
    obs, a = torch.randn(9, 4), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    full = net.recurrent_inference(*net.initial_inference(obs)[:2], a, 1)
    lean = twin.recurrent_inference(*twin.initial_inference(obs)[:2], a, 1, scalars=False)
    assert full.value is not None and lean.value is None and lean.value_prefix is None
    for name in ("latent", "policy_logits", "value_prefix_logits", "value_logits"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    assert all(torch.equal(x, y) for x, y in zip(full.lstm_state, lean.lstm_state))


def test_mlp_variant_same_interface():
    torch.manual_seed(0)
    net = make_model((4,), 2, hidden=32, latent_dim=16, lstm_hidden=8, support_size=10,
                     proj_hid=16, proj_out=16, pred_hid=8, pred_out=16).eval()
    obs = torch.randn(7, 4)
    with torch.no_grad():
        out = net.initial_inference(obs)
        rec = net.recurrent_inference(out.latent, out.lstm_state, torch.zeros(7, dtype=torch.long), 1)
    assert out.latent.shape == rec.latent.shape == (7, 16)
    assert rec.lstm_state[0].shape == (7, 8)
    assert rec.value_prefix_logits.shape == rec.value_logits.shape == (7, 21)
    assert rec.policy_logits.shape == (7, 2)
    assert torch.equal(rec.value, torch.zeros(7))
    assert net.project(rec.latent, True).shape == (7, 16)
    assert net.latent_shape == (16,) and net.support_size == 10 and net.lstm_hidden == 8


def test_obs_norm_puts_every_input_feature_at_unit_scale():
    """--obs-norm: a BatchNorm on the representation's input. A feature's units then do not matter: in training
    (batch statistics) a feature scaled by 1/10 and another shifted gives the same latent, and inference normalizes with
    the running statistics of what training saw. Without it the same rescaling changes the latent."""
    kw = dict(hidden=32, latent_dim=16, lstm_hidden=8, support_size=10, proj_hid=16, proj_out=16, pred_hid=8,
              pred_out=16)
    torch.manual_seed(0)
    obs = torch.randn(256, 4)
    rescaled = obs * torch.tensor([1.0, 1.0, 1 / 10, 1.0]) + torch.tensor([0.0, 2.0, 0.0, 0.0])
    for obs_norm in (True, False):
        torch.manual_seed(1)
        net = make_model((4,), 2, obs_norm=obs_norm, **kw).train()
        same = torch.allclose(net.encode(obs), net.encode(rescaled), atol=1e-3)
        assert same == obs_norm
    torch.manual_seed(1)
    net = make_model((4,), 2, obs_norm=True, **kw)
    bn = net.representation[0]
    assert isinstance(bn, DepthBatchNorm) and isinstance(net.representation[1], torch.nn.Linear)
    for _ in range(60):                                                    # running statistics follow the data
        net.encode(rescaled[torch.randint(0, 256, (64,))])
    torch.testing.assert_close(bn.running_mean[0], rescaled.mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(bn.running_var[0].sqrt(), rescaled.std(0), atol=0.1, rtol=0.1)
    with torch.no_grad():
        unit = bn.eval()(rescaled)                                         # inference: running statistics
    torch.testing.assert_close(unit.mean(0), torch.zeros(4), atol=0.15, rtol=0)
    torch.testing.assert_close(unit.std(0), torch.ones(4), atol=0.15, rtol=0)
    assert isinstance(make_model((4,), 2, **kw).representation[0], torch.nn.Linear)  # the default: checkpoints
    with pytest.raises(TypeError):                                         # written before the option load
        make_model((12, 96, 96), 6, obs_norm=True)                         # images: frames / 255 already


def test_small_config_is_one_set_of_arguments_away():
    net = make_model((12, 96, 96), 6, channels=16, lstm_hidden=64, proj_hid=256, proj_out=256, pred_hid=64,
                     pred_out=256, support_size=50).eval()
    with torch.no_grad():
        out = net.initial_inference(torch.zeros(2, 12, 96, 96, dtype=torch.uint8))
    assert out.latent.shape == (2, 16, 6, 6) and out.value_logits.shape == (2, 101)
    assert net.project(out.latent, True).shape == (2, 256)


def test_bad_obs_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="obs_shape"):
        make_model((3, 4), 2)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics per unroll depth (model.DepthBatchNorm)
# ---------------------------------------------------------------------------------------------

def test_depth_batchnorm_trains_one_depth_and_infers_per_sample():
    torch.manual_seed(0)
    bn = DepthBatchNorm(3, depths=4)
    for depth, shift in ((0, 0.0), (2, 5.0)):                              # two depths, different inputs
        for _ in range(50):
            bn(torch.randn(64, 3, 2, 2) * 2 + shift, depth)
    torch.testing.assert_close(bn.running_mean[2], torch.full((3,), 5.0), atol=0.3, rtol=0)
    assert bn.running_mean[0].abs().max() < 0.3 and torch.equal(bn.running_mean[1], torch.zeros(3))
    assert (bn.running_var[[0, 2]] > 3).all() and torch.equal(bn.running_var[3], torch.ones(3))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    bn.eval()
    x = torch.randn(6, 3, 2, 2)
    depth = torch.tensor([0, 2, 2, 1, 7, 3])                               # 7 reads the deepest set, 3
    per_sample = bn(x, depth)
    for b, d in enumerate(depth.tolist()):                                 # as nn.BatchNorm2d with set min(d, 3)
        ref = torch.nn.functional.batch_norm(x[b:b + 1], bn.running_mean[min(d, 3)], bn.running_var[min(d, 3)],
                                             bn.weight, bn.bias, False, 0.1, 1e-5)
        torch.testing.assert_close(per_sample[b:b + 1], ref)
        torch.testing.assert_close(bn(x[b:b + 1], d), ref)                 # an int depth: the same
    with torch.no_grad():                                                  # an in-place change is seen at once
        bn.running_mean[2] += 1.0
    assert not torch.allclose(bn(x, depth)[1], per_sample[1])
    torch.testing.assert_close(bn(x, depth)[0], per_sample[0])
    before = bn(x, depth)
    bn.train()(torch.randn(64, 3, 2, 2) + 9, 0)                            # so is a training pass (no version bump)
    assert not torch.allclose(bn.eval()(x, depth)[0], before[0])
    with pytest.raises(ValueError):
        bn.train()(x, depth)                                               # per-sample depths: inference only


def test_batchnorm_state_of_one_set_loads_into_every_depth():
    torch.manual_seed(0)
    old = torch.nn.BatchNorm1d(5)
    old(torch.randn(32, 5) + 3)
    new = DepthBatchNorm(5, depths=6)
    new.load_state_dict(old.state_dict())                                  # a checkpoint from before: one set
    assert torch.equal(new.running_mean, old.running_mean.expand(6, 5))
    assert torch.equal(new.running_var, old.running_var.expand(6, 5))
    x = torch.randn(4, 5)
    torch.testing.assert_close(new.eval()(x, torch.tensor([0, 1, 3, 5])), old.eval()(x))


def test_shared_statistics_is_one_set_for_every_depth():
    net = make_model((4,), 2, hidden=16, latent_dim=8, lstm_hidden=8, support_size=10, proj_hid=8, proj_out=8,
                     pred_hid=8, pred_out=8, bn_depths=1)
    assert net.dynamics.bn.running_mean.shape == (1, 8) and net.prediction.fc_value[1].running_mean.shape == (1, 16)
    net = make_model((4,), 2, hidden=16, latent_dim=8, lstm_hidden=8, support_size=10, proj_hid=8, proj_out=8,
                     pred_hid=8, pred_out=8, bn_depths=6)
    assert net.dynamics.bn.running_mean.shape == (6, 8) and net.prediction.fc_value[1].running_mean.shape == (6, 16)
    assert net.representation[1].running_mean.shape == (1, 16)            # the representation: depth 0 only
