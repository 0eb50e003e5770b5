"""The verl and TRL adapters against the installed peer packages (``bash .ci/peers.sh`` installs
verl 0.9.1 and trl 1.16.0; without them these tests skip, saying so).

verl: our losses through verl's own registry (``get_policy_loss_fn``) against verl's own
``vanilla`` / ``gspo`` / ``sapo`` / ``cispo`` on the same inputs (loss, gradient, metrics; rollout
weights of both signs and zeros), MHPO against the float64 reference aggregated by verl's own
``agg_loss``, our KL estimators against verl's ``kl_penalty``. TRL: ``MHPOGRPOTrainer`` against
``GRPOTrainer._compute_loss`` on one batch (vLLM importance sampling included), and a few training
steps of a tiny random model.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mhpo_kernels import reference as ref

pytestmark = pytest.mark.slow  # the peer packages' imports (verl: ~11 s): the quick loop leaves them out

HAVE_VERL = importlib.util.find_spec("verl") is not None
HAVE_TRL = importlib.util.find_spec("trl") is not None
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="verl is not installed (bash .ci/peers.sh installs it)")
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="trl is not installed (bash .ci/peers.sh installs it)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(actual, expected, what, rtol=1e-7, atol=1e-10):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_importing_the_package_imports_no_peer():
    code = ("import sys, mhpo_kernels, mhpo_kernels.integrations; "
            "bad = sorted(m for m in ('verl', 'trl', 'transformers', 'ray') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- verl

VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LENGTHS = [9, 4, 7, 0, 6]  # one empty response: verl and we both leave it out of the sequence means


def verl_case(seed, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    logp = torch.randn(B, T, generator=g, dtype=torch.float64).clamp(max=0) - 1.0
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]  # both signs, always
    adv = (0.2 + torch.rand(B, 1, generator=g, dtype=torch.float64)) * sign
    adv = adv.expand(B, T).contiguous()
    weights = 0.3 + 1.5 * torch.rand(B, T, generator=g, dtype=torch.float64)  # verl's truncated IS weights: > 0
    return logp, old, adv, mask, weights


def actor_config(global_batch_info=None, **policy_loss):
    from mhpo_kernels.integrations.verl import MHPOPolicyLossConfig
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                           clip_ratio_low=0.2, clip_ratio_high=0.28, tau_pos=1.0, tau_neg=1.05,
                           policy_loss=MHPOPolicyLossConfig(**policy_loss),
                           global_batch_info=dict(global_batch_info or {}))


WEIGHTS = ["plain", "global+weights", "icepop", "tis_seq", "signed"]


def rollout_weights(extras, old, mask, seed=2):
    """verl's rollout_is_weights for a WEIGHTS case (None for "plain"): random > 0, token IcePop at
    [0.5, 2] (zeros), sequence TIS at 2 (truncated), or of both signs (verl multiplies any)."""
    from mhpo_kernels.integrations.rollout_correction import verl_rollout_is_weights

    g = torch.Generator().manual_seed(seed)
    rollout = old + 0.6 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    if extras == "plain":
        return None
    if extras == "icepop":
        w = verl_rollout_is_weights(old, rollout, mask, "token", "0.5_2.0")
        assert (w[mask] == 0).any() and (w[mask] > 0).any()
        return w
    if extras == "tis_seq":
        w = verl_rollout_is_weights(old, rollout, mask, "sequence", 2.0)
        assert (w[mask] == 2.0).any() and (w[mask] < 2.0).any()
        return w
    w = verl_case(seed)[-1]
    if extras == "signed":
        w = w - 1.0
        assert (w[mask] < 0).any() and (w[mask] > 0).any()
    return w


def global_info(mask, dp_size=2):
    """What verl's trainer sets for a micro-batch of a larger global batch (here: this batch twice)."""
    return dict(dp_size=dp_size, batch_num_tokens=2 * int(mask.sum()),
                global_batch_size=2 * int((mask.sum(-1) > 0).sum()), loss_scale_factor=16)


def call(name, logp, old, adv, mask, mode, config, weights):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    x = logp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                             loss_agg_mode=mode, config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


@needs_verl
@pytest.mark.parametrize("extras", WEIGHTS)
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("ours,theirs", [("mk_vanilla", "vanilla"), ("mk_gspo", "gspo"), ("mk_sapo", "sapo"),
                                         ("mk_cispo", "cispo")])
def test_verl_losses_through_verl_registry(ours, theirs, mode, extras):
    """Our ClipConfig / GSPOConfig / SAPOConfig / CISPOConfig behind verl's registry == verl's own
    function: same config keys, aggregation (global normalisers included), rollout weights (as
    importance_weights), metrics."""
    import mhpo_kernels.integrations.verl  # noqa: F401

    logp, old, adv, mask, _ = verl_case(seed=len(ours + mode))
    config = actor_config(None if extras == "plain" else global_info(mask), loss_mode=ours)
    w = rollout_weights(extras, old, mask)
    loss, grad, metrics = call(ours, logp, old, adv, mask, mode, config, w)
    want_loss, want_grad, want_metrics = call(theirs, logp, old, adv, mask, mode, config, w)
    close(loss, want_loss, "loss")
    close(grad, want_grad, "grad")
    assert set(want_metrics) <= set(metrics)
    for k, v in want_metrics.items():
        close(metrics[k], v, k)
    if ours in ("mk_vanilla", "mk_cispo"):  # the case exercises both clip edges (and vanilla's dual clip)
        assert 0 < want_metrics["actor/pg_clipfrac"] < 1
        assert ours == "mk_cispo" or 0 < want_metrics["actor/pg_clipfrac_lower"] < 1


@needs_verl
def test_verl_cispo_config():
    """verl's clip_ratio_low / clip_ratio_high (default clip_ratio) -> CISPOConfig; a lower bound
    >= 1 clamps nothing (eps_low=None)."""
    from mhpo_kernels import CISPOConfig
    from mhpo_kernels.integrations.verl import cispo_config_from_verl

    assert cispo_config_from_verl(actor_config(loss_mode="mk_cispo")) == CISPOConfig(0.2, 0.28)
    assert cispo_config_from_verl(dict(clip_ratio=0.3)) == CISPOConfig(0.3, 0.3)
    assert cispo_config_from_verl(dict(clip_ratio_low=1.0, clip_ratio_high=4.0)) == CISPOConfig(None, 4.0)


@needs_verl
@pytest.mark.parametrize("verl_name", ["k1", "kl", "k2", "mse", "k3", "low_var_kl"])
def test_verl_kl_penalty_equals_kl_estimator(verl_name):
    """verl's kl_penalty(logp, ref, name) == our KL_ESTIMATORS[name] (value and gradient), as the
    per-token loss of a zero-advantage policy loss with beta = 1 (reduce=False, token-sum: mask * kl)
    and as metrics["token_kl"]; ref - logp spans verl's +-20 clamp and its +-10 value clamp."""
    import mhpo_kernels as mk
    from mhpo_kernels.integrations.verl import KL_ESTIMATORS
    from verl.trainer.ppo.core_algos import kl_penalty

    g = torch.Generator().manual_seed(len(verl_name))
    logp, old, _, mask, _ = verl_case(seed=2)
    ref = logp + torch.empty(logp.shape, dtype=logp.dtype).uniform_(-25, 25, generator=g)
    ref[0, :4] = logp[0, :4] + torch.tensor([-0.3, 0.2, 1e-9, 3.0], dtype=logp.dtype)  # k3's small-d branch too
    upstream = torch.rand(logp.shape, generator=g, dtype=logp.dtype)

    x = logp.clone().requires_grad_()
    want = kl_penalty(x, ref, verl_name) * mask
    (want * upstream).sum().backward()
    y = logp.clone().requires_grad_()
    out = mk.policy_loss_from_logprobs(y, y.detach(), torch.zeros_like(logp), mask, ratio_control=mk.ClipConfig(),
                                       ref_logprobs=ref, beta=1.0, kl_estimator=KL_ESTIMATORS[verl_name],
                                       loss_agg_mode="token-sum", reduce=False)
    (out.loss * upstream).sum().backward()
    close(out.loss, want, "per-token kl")
    close(out.metrics["token_kl"], want, "token_kl")
    close(y.grad, x.grad, "grad")
    if verl_name in ("k3", "low_var_kl"):  # the clamps act: their gradient is 0
        assert (want.detach() == 10).any() and (x.grad[mask] == 0).any()


def reference_token_loss(name, logp, old, adv, mask, cfg):
    m = mask.double()
    if name == "mhpo_seq":
        return ref.sequence_token_loss(logp, old, adv, m, cfg)
    return ref.token_loss(torch.where(mask, logp - old, torch.zeros_like(old)), adv, cfg)


@needs_verl
@pytest.mark.parametrize("extras", WEIGHTS)
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("name", ["mhpo", "mhpo_seq"])
def test_verl_mhpo_vs_reference(name, mode, extras):
    """MHPO through verl's registry == the float64 reference's per-token loss (times the rollout
    weights) aggregated by verl's own agg_loss; the parameters come from the actor config."""
    import mhpo_kernels as mk
    import mhpo_kernels.integrations.verl  # registers
    from verl.trainer.ppo.core_algos import agg_loss

    logp, old, adv, mask, _ = verl_case(seed=len(name + mode))
    info = None if extras == "plain" else global_info(mask)
    config = actor_config(info, loss_mode=name, mhpo_c=2.0, mhpo_k_pos=1.3, mhpo_lam_neg=0.9)
    cfg = mk.MHPOConfig(c=2.0, k_pos=1.3, lam_neg=0.9)
    weights = rollout_weights(extras, old, mask)
    loss, grad, metrics = call(name, logp, old, adv, mask, mode, config, weights)

    x = logp.clone().requires_grad_()
    L = reference_token_loss(name, x, old, adv, mask, cfg)
    want = agg_loss(L if weights is None else L * weights, mask, mode, **(info or {}))
    want.backward()
    close(loss, want, "loss")
    close(grad, x.grad, "grad")
    delta = torch.where(mask, logp - old, torch.zeros_like(old))
    close(metrics["actor/ppo_kl"], -delta.sum() / mask.sum(), "ppo_kl")
    level_delta = delta if name == "mhpo" else torch.where(mask, ref.sequence_log_ratio(delta, mask.double())[:, None],
                                                           torch.zeros_like(old))
    want_metrics = ref.policy_metrics(cfg, level_delta.reshape(-1), mask.reshape(-1))
    for k in ("psi_mean", "zeta_mean", "survival_mean", "low_survival_frac"):
        close(metrics[f"actor/mhpo_{k}"], want_metrics[k], k, rtol=1e-6, atol=1e-7)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/pg_clipfrac_lower"] == 0.0


@needs_verl
@pytest.mark.parametrize("mode", VERL_MODES)
def test_verl_micro_batches_add_up(mode):
    """With verl's global_batch_info, the micro-batch losses (and gradients) add up to the loss of
    the whole batch computed in one call."""
    import mhpo_kernels.integrations.verl  # noqa: F401

    logp, old, adv, mask, weights = verl_case(seed=3)
    whole = call("mhpo", logp, old, adv, mask, mode, actor_config(loss_mode="mhpo"), weights)
    info = dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=int((mask.sum(-1) > 0).sum()))
    parts = [call("mhpo", logp[s], old[s], adv[s], mask[s], mode, actor_config(info, loss_mode="mhpo"), weights[s])
             for s in (slice(0, 2), slice(2, None))]
    close(parts[0][0] + parts[1][0], whole[0], "loss")
    close(torch.cat([parts[0][1], parts[1][1]]), whole[1], "grad")


@needs_verl
def test_verl_config_through_hydra_targets():
    """The documented overrides: verl builds the actor config from ``_target_``s; ours adds mhpo_*."""
    from mhpo_kernels.integrations.verl import mhpo_config_from_verl
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.create({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 1,
        "policy_loss": {"_target_": "mhpo_kernels.integrations.verl.MHPOPolicyLossConfig", "loss_mode": "mhpo",
                        "mhpo_c": 2.5, "mhpo_use_dhp": False}})
    got = mhpo_config_from_verl(omega_conf_to_dataclass(cfg))
    assert (got.c, got.use_dhp, got.k_pos) == (2.5, False, 1.5)
    plain = omega_conf_to_dataclass(OmegaConf.create({**cfg, "policy_loss": {"loss_mode": "mhpo"}}))
    from mhpo_kernels import MHPOConfig
    assert mhpo_config_from_verl(plain) == MHPOConfig()  # verl's own PolicyLossConfig: the paper's defaults


@needs_verl
def test_verl_bad_input():
    import mhpo_kernels.integrations.verl as adapter

    logp, old, adv, mask, weights = verl_case(seed=1)
    with pytest.raises(ValueError, match="shape"):
        call("mhpo", logp, old, adv, mask, "token-mean", actor_config(loss_mode="mhpo"), weights[:, :3])
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        call("mhpo", logp, old, adv, mask, "token-mean", actor_config(dict(dp_size=2), loss_mode="mhpo"), None)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        call("mhpo", logp, old, adv, mask, "token-max", actor_config(loss_mode="mhpo"), None)
    with pytest.raises(ValueError, match="already has a policy loss named 'vanilla'"):
        adapter.register("vanilla")
    with pytest.raises(ValueError, match="c must be a finite number"):
        call("mhpo", logp, old, adv, mask, "token-mean", actor_config(loss_mode="mhpo", mhpo_c=-1.0), None)


@needs_verl
@pytest.mark.slow
def test_verl_external_modules_hook_registers_in_a_fresh_process():
    """The documented switch: VERL_USE_EXTERNAL_MODULES makes `import verl` register our losses."""
    code = ("from verl.trainer.ppo.core_algos import get_policy_loss_fn; "
            "assert get_policy_loss_fn('mhpo').__module__ == 'mhpo_kernels.integrations.verl'")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="mhpo_kernels.integrations.verl")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


VERL_FUSED = ("import json, verl.utils.torch_functional as vF, verl.workers.rollout.naive.naive_rollout as naive; "
              "from mhpo_kernels.integrations import verl as adapter; "
              "fns = [getattr(vF, n) for n in ('logprobs_from_logits', 'entropy_from_logits', "
              "'entropy_from_logits_with_chunking')] + [naive.logprobs_from_logits]; "
              "print(json.dumps([getattr(f, '_mhpo_fused', False) for f in fns] "
              "+ [adapter.FUSED_LOGPROBS_PATCH is not None]))")


@needs_verl
@pytest.mark.slow
@pytest.mark.parametrize("value", ["1", None])
def test_verl_fused_logprobs_env_in_a_fresh_process(value):
    """MHPO_VERL_FUSED_LOGPROBS=1 with the external-modules hook: `import verl` rebinds verl's log-prob
    and entropy functions to the fused ones (a module imported later binds them too); unset, nothing."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="mhpo_kernels.integrations.verl")
    env.pop("MHPO_VERL_FUSED_LOGPROBS", None)
    if value is not None:
        env["MHPO_VERL_FUSED_LOGPROBS"] = value
    out = subprocess.run([sys.executable, "-c", VERL_FUSED], check=True, cwd=ROOT, env=env, capture_output=True,
                         text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [value is not None] * 5


@needs_verl
def test_verl_fused_logprobs_env_values():
    import verl.utils.torch_functional as vF

    from mhpo_kernels.integrations import fused_logits as fl
    from mhpo_kernels.integrations import verl as adapter

    assert adapter.FUSED_LOGPROBS_PATCH is None and not getattr(vF.logprobs_from_logits, "_mhpo_fused", False)
    for off in ("", "0", " false", "No", "OFF"):
        assert adapter.patch_from_env(off) is None
    with pytest.raises(ValueError, match="MHPO_VERL_FUSED_LOGPROBS must be 1"):
        adapter.patch_from_env("fused")
    original = vF.entropy_from_logits
    with adapter.patch_from_env("True") as handle:
        assert vF.entropy_from_logits is fl.verl_entropy_from_logits and handle.active
    assert vF.entropy_from_logits is original


# ----------------------------------------------------------------------------------------------- TRL

TRL_V = 151936  # Qwen2's vocabulary (the slow tests); the fast ones use a small one, same code path
SMALL_V = 2048


@pytest.fixture(scope="module")
def tiny_qwen():
    """vocab size -> (tokenizer, model factory): a word-level tokenizer over ``t0 .. t{V-1}`` and a
    randomly initialised 2-layer Qwen2 with hidden size 64; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    def build(V):
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")
        tokenizer.padding_side = "left"
        config = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=1, eos_token_id=2)

        def model(seed=0):
            torch.manual_seed(seed)
            return Qwen2ForCausalLM(config)

        return tokenizer, model

    cache = {}

    def get(V=SMALL_V):
        if V not in cache:
            cache[V] = build(V)
        return cache[V]

    return get


def toy_reward(completions, **kw):
    """Prefers completions with even token ids (a reward the tiny model can move)."""
    return [sum(int(t[1:]) % 2 == 0 for t in c.split()) / max(len(c.split()), 1) for c in completions]


def grpo_trainer(tiny_qwen, tmp_path, control=None, V=SMALL_V, softcap=None, **args):
    from datasets import Dataset
    from mhpo_kernels.integrations.trl import MHPOGRPOConfig, MHPOGRPOTrainer

    tokenizer, model = tiny_qwen(V)
    dataset = Dataset.from_dict({"prompt": [f"t{10 + i} t{200 + i} t{1000 + i}" for i in range(16)]})
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0, logging_steps=1)
    config = MHPOGRPOConfig(**{**base, **args})
    m = model()
    if softcap is not None:  # Gemma's: TRL's fused head reads it from the config
        m.config.final_logit_softcapping = softcap
    return MHPOGRPOTrainer(model=m, reward_funcs=toy_reward, args=config, train_dataset=dataset,
                           processing_class=tokenizer, ratio_control=control)


def trl_batch(trainer, seed, V=SMALL_V):
    """One batch of _compute_loss inputs with off-policy old / reference log-probs, both advantage
    signs and an empty completion."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 4, 3, 6
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    completion_mask = (torch.arange(C)[None, :] < torch.tensor([6, 3, 0, 5])[:, None]).long()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([1.2, -0.7, 0.4, -1.5]),
                  num_items_in_batch=completion_mask.sum())
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), C)
    inputs["old_per_token_logps"] = logp + 0.5 * torch.randn(B, C, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, C, generator=g)
    return inputs


def loss_and_grads(trainer, compute_loss, inputs):
    trainer.model.zero_grad()
    loss = compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def assert_matches_grpo_trainer(trainer, inputs):
    """The adapter's _compute_loss: loss and every parameter gradient == TRL's own GRPOTrainer._compute_loss."""
    from trl import GRPOTrainer

    loss, grads = loss_and_grads(trainer, trainer._compute_loss, inputs)
    want, want_grads = loss_and_grads(trainer, lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), inputs)
    scale = max(g.abs().max().item() for g in want_grads)
    close(loss, want, "loss", rtol=1e-5, atol=1e-7)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        close(g, w, f"grad of parameter {i}", rtol=1e-4, atol=1e-5 * scale)


TRL_CASES = {  # name -> MHPOGRPOConfig arguments (ratio_control="trl": TRL's own surrogate, by us)
    "grpo": dict(loss_type="grpo"),
    "bnpo_two_sided": dict(loss_type="bnpo", delta=1.5),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8),  # > the batch's 6 columns: TRL divides by 8
    "dapo_clip_higher": dict(loss_type="dapo", epsilon_high=0.28),
    "sapo": dict(loss_type="sapo"),
    "gspo_kl": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.04),
    "bnpo_kl_plain": dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False),
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),
    "cispo_kl": dict(loss_type="cispo", epsilon_high=1.3, beta=0.04),
    "cispo_seq": dict(loss_type="cispo", epsilon_high=1.3, importance_sampling_level="sequence"),
}


def assert_same_metrics(trainer, names):
    """The metrics our _compute_loss and then TRL's logged (in that order) agree."""
    for name in names:
        ours, theirs = trainer._metrics["train"][name][-2:]
        close(ours, theirs, name, rtol=1e-5, atol=1e-7)


@needs_trl
@pytest.mark.parametrize("case", list(TRL_CASES))
def test_trl_loss_equals_grpo_trainer(tiny_qwen, tmp_path, case):
    """ratio_control="trl": our loss and gradients == GRPOTrainer._compute_loss's on the same batch
    (gradient accumulation 2: TRL's scaling too)."""
    args = dict(TRL_CASES[case])
    beta = args.pop("beta", 0.0)
    trainer = grpo_trainer(tiny_qwen, tmp_path, ratio_control="trl", **args)
    trainer.beta = beta  # _compute_loss reads it; a real beta > 0 would also load a reference model
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    inputs = trl_batch(trainer, seed=len(case))
    assert_matches_grpo_trainer(trainer, inputs)
    if args["loss_type"] == "cispo":
        assert_same_metrics(trainer, ["cispo_clip_ratio"])
        if case != "cispo_seq":  # one positive-advantage sequence there: its ratio is clamped or not
            assert 0 < trainer._metrics["train"]["cispo_clip_ratio"][-1] < 1


@needs_trl
@pytest.mark.parametrize("case", [
    "grpo-token_truncate", "grpo-sequence_mask", "dr_grpo-token_mask", "cispo-sequence_truncate",
    "dapo-token_mask+entropy+off_policy"])
def test_trl_vllm_importance_sampling_equals_grpo_trainer(tiny_qwen, tmp_path, case):
    """TRL's vLLM importance_sampling_ratio (built by rollout_correction.trl_importance_sampling_ratio;
    [B, 1] in the sequence modes, as TRL passes it) reaches our loss as importance_weights, with the
    entropy and off-policy masks: loss and gradients == GRPOTrainer._compute_loss's."""
    from mhpo_kernels.integrations.rollout_correction import trl_importance_sampling_ratio

    loss_type, rest = case.split("-")
    mode, *extra = rest.split("+")
    args = dict(loss_type=loss_type, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.7,
                vllm_importance_sampling_clip_max=1.5)
    if loss_type == "cispo":
        args["epsilon_high"] = 1.3
    if extra:
        args.update(top_entropy_quantile=0.5, off_policy_mask_threshold=0.05)
    trainer = grpo_trainer(tiny_qwen, tmp_path, ratio_control="trl", **args)
    trainer.use_vllm = True  # _compute_loss applies the ratio only then; nothing else here reads it
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    inputs = trl_batch(trainer, seed=len(case))
    g = torch.Generator().manual_seed(7)
    old = inputs["old_per_token_logps"]
    inputs["sampling_per_token_logps"] = old + 0.4 * torch.randn(old.shape, generator=g)
    ratio = trl_importance_sampling_ratio(old, inputs["sampling_per_token_logps"], inputs["completion_mask"], mode,
                                          clip_max=1.5, clip_min=0.7)
    active = ratio[inputs["completion_mask"].bool()]
    assert (active == (0 if mode.endswith("mask") else 1.5)).any(), "the case reaches a bound"
    inputs["importance_sampling_ratio"] = ratio[:, :1] if mode.startswith("sequence") else ratio
    assert_matches_grpo_trainer(trainer, inputs)


@needs_trl
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_mhpo_vs_reference(tiny_qwen, tmp_path, level):
    """The default switch (MHPO, parameters from MHPOGRPOConfig): loss and gradients == the float64
    reference's per-token MHPO loss aggregated TRL's "grpo" way (empty completions count, accumulation 2)."""
    import mhpo_kernels as mk

    trainer = grpo_trainer(tiny_qwen, tmp_path, loss_type="grpo", importance_sampling_level=level, mhpo_c=2.0,
                           mhpo_k_neg=1.7)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    inputs = trl_batch(trainer, seed=11)
    loss, grads = loss_and_grads(trainer, trainer._compute_loss, inputs)

    def reference_loss(model, x):
        ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, torch.cat([x["prompt_mask"], x["completion_mask"]], 1), ids.shape[1] - 3)
        mask = x["completion_mask"] != 0
        old, adv = x["old_per_token_logps"].double(), x["advantages"].double()[:, None].expand(mask.shape)
        L = reference_token_loss("mhpo" if level == "token" else "mhpo_seq", logp.double(), old, adv, mask,
                                 mk.MHPOConfig(c=2.0, k_neg=1.7))
        return ((L * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / 2

    want, want_grads = loss_and_grads(trainer, reference_loss, inputs)
    scale = max(g.abs().max().item() for g in want_grads)
    close(loss, want, "loss", rtol=1e-5, atol=1e-7)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        close(g, w, f"grad of parameter {i}", rtol=1e-4, atol=1e-5 * scale)


@needs_trl
def test_trl_bad_input(tiny_qwen, tmp_path):
    from mhpo_kernels.integrations.trl import MHPOGRPOConfig

    with pytest.raises(ValueError, match="ratio_control must be 'mhpo' or 'trl'"):
        MHPOGRPOConfig(output_dir=str(tmp_path), ratio_control="ppo", report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="c must be a finite number"):
        MHPOGRPOConfig(output_dir=str(tmp_path), mhpo_c=0.0, report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(NotImplementedError, match="loss_type='vespo'"):
        grpo_trainer(tiny_qwen, tmp_path, loss_type="vespo")
    with pytest.raises(ValueError, match="epsilon_high.*must be > 1"):
        grpo_trainer(tiny_qwen, tmp_path, ratio_control="trl", loss_type="cispo", epsilon_high=0.28)
    with pytest.raises(NotImplementedError, match="entropy bonus"):
        grpo_trainer(tiny_qwen, tmp_path, entropy_coef=0.01)
    with pytest.raises(TypeError, match="ratio_control must be one of"):
        grpo_trainer(tiny_qwen, tmp_path, control="mhpo")


def scored(trainer, inputs):
    """The trainer's (log-probs, entropies) of the batch's completions, through its model's fused head."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    C = inputs["completion_ids"].shape[1]
    logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C, compute_entropy=True)
    return logp, ent


@needs_trl
def test_trl_fused_lm_head_equals_trl_head(tiny_qwen, tmp_path, trl_head_calls):
    """mhpo_fused_lm_head=True: the model scores completions with this package's tiles (TRL's head
    function never runs for it; another trainer's model keeps TRL's), and the log-probs, entropies and
    the full _compute_loss (loss, every parameter gradient) equal TRL's own GRPOTrainer on TRL's head."""
    import trl.trainer.utils as tU
    from trl import GRPOTrainer

    args = dict(ratio_control="trl", loss_type="dapo", epsilon_high=0.28, temperature=0.7)
    ours = grpo_trainer(tiny_qwen, tmp_path, mhpo_fused_lm_head=True, **args)
    theirs = grpo_trainer(tiny_qwen, tmp_path, **args)
    assert ours.mhpo_fused_lm_head and not theirs.mhpo_fused_lm_head  # off by default
    assert theirs.model.forward.__func__.__globals__ is vars(tU)
    for t in (ours, theirs):
        t.beta = 0.04  # _compute_loss reads it (the reference log-probs are the batch's)
        t.current_gradient_accumulation_steps = 2
        t.model.train()
    inputs = trl_batch(theirs, seed=3)
    n = len(trl_head_calls)
    (logp, ent), (want_logp, want_ent) = scored(ours, inputs), scored(theirs, inputs)
    assert len(trl_head_calls) == n + 1  # theirs only
    close(logp, want_logp, "log-probs", rtol=1e-5, atol=1e-6)
    close(ent, want_ent, "entropies", rtol=1e-5, atol=1e-6)
    loss, grads = loss_and_grads(ours, ours._compute_loss, inputs)
    assert len(trl_head_calls) == n + 1
    want, want_grads = loss_and_grads(theirs, lambda m, x: GRPOTrainer._compute_loss(theirs, m, x), inputs)
    scale = max(g.abs().max().item() for g in want_grads)
    close(loss, want, "loss", rtol=1e-5, atol=1e-7)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        close(g, w, f"grad of parameter {i}", rtol=1e-4, atol=1e-5 * scale)


@needs_trl
def test_trl_fused_lm_head_leaves_a_softcapped_head_to_trl(tiny_qwen, tmp_path, trl_head_calls):
    """A softcapped head (Gemma's final_logit_softcapping): mhpo_fused_lm_head=True hands the call to
    TRL's function, which gives what TRL's trainer gets."""
    ours = grpo_trainer(tiny_qwen, tmp_path, mhpo_fused_lm_head=True, softcap=2.0)
    theirs = grpo_trainer(tiny_qwen, tmp_path, softcap=2.0)
    inputs = trl_batch(theirs, seed=4)
    n = len(trl_head_calls)
    (logp, ent), (want_logp, want_ent) = scored(ours, inputs), scored(theirs, inputs)
    assert len(trl_head_calls) == n + 2 and trl_head_calls[-1][0] == 2.0
    close(logp, want_logp, "log-probs", rtol=0, atol=0)
    close(ent, want_ent, "entropies", rtol=0, atol=0)


@needs_trl
@pytest.mark.slow
def test_trl_full_vocab_step_equals_grpo_trainer(tiny_qwen, tmp_path):
    """The clip case at Qwen2's real vocabulary size (151936)."""
    trainer = grpo_trainer(tiny_qwen, tmp_path, V=TRL_V, ratio_control="trl", loss_type="dapo", epsilon_high=0.28)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = trl_batch(trainer, seed=5, V=TRL_V)
    assert_matches_grpo_trainer(trainer, inputs)


@needs_trl
@pytest.mark.slow
def test_trl_trains_five_steps_with_mhpo(tiny_qwen, tmp_path):
    """GRPOTrainer's own loop (generation, rewards, advantages, two iterations per batch so the
    ratios leave 1) runs 5 optimizer steps with MHPO on CPU at V = 151936."""
    trainer = grpo_trainer(tiny_qwen, tmp_path, V=TRL_V, loss_type="grpo", max_steps=5, num_iterations=2,
                           learning_rate=1e-2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(0 < h["mhpo/survival_mean"] <= 1 for h in logs)
    assert any(h["mhpo/psi_mean"] != 0 for h in logs), "the second iteration of a batch is off-policy"
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


# ------------------------------------------------------------------------------------------ examples

def switch_example():
    """examples/switch.py as a module."""
    spec = importlib.util.spec_from_file_location("switch_example", os.path.join(ROOT, "examples", "switch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_switch_runs():
    """``python examples/switch.py`` runs every switch (a fresh process, CPU, no peer needed)."""
    r = subprocess.run([sys.executable, os.path.join("examples", "switch.py")], cwd=ROOT, check=True,
                       capture_output=True, text=True)
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [words[0] for words in lines] == [f.__name__ for f in switch_example().SWITCHES], r.stdout
    assert all(torch.isfinite(torch.tensor(float(words[2]))) for words in lines)


def trl_1_16_token_loss(logp, old, adv, mask, loss_type, epsilon_high, importance_sampling_ratio=None,
                        max_completion_length=None, normalizer=None):
    """trl 1.16.0 GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, lines 3084-3170), transcribed for
    importance_sampling_level="token", epsilon=0.2, beta=0, accumulation 1, the vLLM ratio when given."""
    advantages = adv.unsqueeze(1)
    coef_1 = torch.exp(logp - old)
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / normalizer  # cispo


def value_and_grad(fn, logp, *args, **kw):
    x = logp.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", ["trl_grpo_loss", "trl_dr_grpo_loss", "trl_cispo_loss"])
def test_examples_trl_switches_equal_trl(name):
    """Each TRL switch of examples/switch.py == TRL's own lines (value and gradient), the vLLM ratio
    built by TRL's own lines (tests/test_rollout_correction.py's verbatim copy)."""
    from test_rollout_correction import trl_1_16_importance_sampling_ratio

    ex = switch_example()
    logp, old, rollout, ref, adv, mask = ex.batch(seed=len(name))
    mask = mask.long()  # TRL's completion_mask
    if name == "trl_grpo_loss":
        ratio = trl_1_16_importance_sampling_ratio(old, rollout, mask, None, "sequence_mask", None, 3.0)
        assert (ratio == 0).any() and (ratio > 0).any()
        want = value_and_grad(trl_1_16_token_loss, logp, old, adv, mask, "grpo", 0.2, importance_sampling_ratio=ratio)
        got = value_and_grad(ex.trl_grpo_loss, logp, old, rollout, ref, adv, mask)
    elif name == "trl_dr_grpo_loss":
        want = value_and_grad(trl_1_16_token_loss, logp, old, adv, mask, "dr_grpo", 0.2, max_completion_length=32)
        got = value_and_grad(ex.trl_dr_grpo_loss, logp, old, rollout, ref, adv, mask, max_completion_length=32)
    else:
        old = logp.detach() - 2.5 * torch.rand(old.shape, generator=torch.Generator().manual_seed(0))
        assert ((logp - old).exp()[mask.bool()] > 5.0).any(), "the clamp acts"
        normalizer = mask.sum() * 2.0  # the generation batch spans two micro-batches
        want = value_and_grad(trl_1_16_token_loss, logp, old, adv, mask, "cispo", 5.0, normalizer=normalizer)
        got = value_and_grad(ex.trl_cispo_loss, logp, old, rollout, ref, adv, mask, normalizer)
    close(got[0], want[0], "loss", rtol=1e-5, atol=1e-7)
    close(got[1], want[1], "grad", rtol=1e-5, atol=1e-7)


@needs_verl
def test_examples_verl_switch_equals_verl():
    """examples/switch.py's verl switch == verl's own actor loss pieces (ppo_loss in
    verl/workers/utils/losses.py): compute_rollout_correction_weights, compute_policy_loss_cispo,
    kl_penalty + agg_loss times kl_loss_coef (value and gradient)."""
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_cispo, kl_penalty
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    ex = switch_example()
    logp, old, rollout, ref, adv, mask = ex.batch(seed=1)
    config = actor_config(loss_mode="cispo")  # clip_ratio_low=0.2, clip_ratio_high=0.28
    w, _ = compute_rollout_correction_weights(old - rollout, mask, "token", 2.0)
    assert (w[mask] == 2.0).any()

    def verl_loss(x):
        pg, _ = compute_policy_loss_cispo(old, x, adv[:, None].expand_as(x), mask, "token-mean", config,
                                          rollout_is_weights=w)
        return pg + agg_loss(kl_penalty(x, ref, "low_var_kl"), mask, "token-mean") * 0.001

    want = value_and_grad(verl_loss, logp)
    got = value_and_grad(ex.verl_ppo_loss, logp, old, rollout, ref, adv, mask)
    close(got[0], want[0], "loss", rtol=1e-5, atol=1e-7)
    close(got[1], want[1], "grad", rtol=1e-5, atol=1e-7)
