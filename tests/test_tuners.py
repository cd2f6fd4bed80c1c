import copy

import pytest

from rltune import compression as C
from rltune.env import DistillCompressEnv
from rltune.errors import RltuneError
from rltune.scenario import parse_scenario
from rltune.tuners import TUNERS, run_tuner

TINY = parse_scenario({
    "name": "tiny", "dataset": {"source": "wine", "transfer": 200},
    "teacher": {"arch": "mlp", "hidden": [32], "epochs": 30},
    "student": {"arch": "mlp", "hidden": [16], "pretrain_epochs": 5},
    "training": {"stages": 3, "epochs_per_stage": 1, "batch_size": 64, "lr": 0.005},
})


@pytest.fixture(scope="module")
def env():
    return DistillCompressEnv(scenarios=[TINY], targets=["6x"])


def run_counting_stages(env, *args, **kw):
    """Run a tuner and count the stages it trains (every tuner's stages go through env.advance)."""
    counted = []
    real = env.advance

    def counting(*a, **k):
        counted.append(1)
        return real(*a, **k)

    env.advance = counting
    try:
        return run_tuner(*args, **kw), len(counted)
    finally:
        del env.advance


@pytest.mark.parametrize("tuner", [t for t in TUNERS if not t.startswith("ppo-")])
@pytest.mark.parametrize("budget", [3, 8])
def test_every_tuner_respects_its_stage_budget(env, tuner, budget):
    r, counted = run_counting_stages(env, tuner, env, 0, "6x", 0, budget)
    assert counted == r.stages_used <= budget
    one_episode = ("recipe", "recipe-plus1", "sensitivity", "sensitivity-pick", "owl", "fixed-8bit", "adaptive-tau")
    assert r.stages_used == (3 if tuner in one_episode else 3 * (budget // 3))
    assert r.test["ratio"] >= 6.0  # the target is met whatever the tuner chose


def test_budget_below_one_episode_is_a_clear_error(env):
    with pytest.raises(RltuneError, match="less than one episode"):
        run_tuner("random", env, 0, "6x", 0, 2)


def test_reported_score_is_the_env_efficiency_score():
    trade = DistillCompressEnv(scenarios=[TINY], targets=["6x"], mode="tradeoff", action_penalty=0.0)
    r = run_tuner("recipe", trade, 0, "6x", 0, 3)
    # the trade-off env pays the change in the efficiency score at each step: its last score is the
    # score of the final student, which is what the tuner reports
    assert r.val_score == pytest.approx(trade.last_score)
    assert r.val_score != 0.0


@pytest.fixture(scope="module")
def agent(env, tmp_path_factory):
    from stable_baselines3 import PPO

    from rltune.agentfile import save_agent
    from rltune.env import ACTION_LAYOUT, OBS_LAYOUT

    model = PPO("MlpPolicy", env, policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, seed=0)
    return save_agent(model, tmp_path_factory.mktemp("agent") / "a", OBS_LAYOUT, ACTION_LAYOUT,
                      {"scenarios": ["tiny"]})


@pytest.mark.parametrize("tuner", ["ppo-replay", "ppo-best-of-n", "ppo-warm-tpe", "ppo-finetune"])
@pytest.mark.parametrize("budget,used", [(3, 3), (8, 6), (15, 15)])
def test_ppo_tuners_respect_their_stage_budget(env, agent, tuner, budget, used):
    r, counted = run_counting_stages(env, tuner, env, 0, "6x", 0, budget, agent=agent)
    assert counted == r.stages_used == (3 if tuner == "ppo-replay" else used)
    assert r.test["ratio"] >= 6.0


def test_ppo_finetune_updates_the_policy_on_a_full_rollout(env, agent, monkeypatch):
    # 15 stages: 4 fine-tuning episodes (one rollout of 4 x 3 steps, then a PPO update) + the replay
    from stable_baselines3 import PPO

    updates = []
    real = PPO.train
    monkeypatch.setattr(PPO, "train", lambda self: (updates.append(1), real(self))[1])
    r = run_tuner("ppo-finetune", env, 0, "6x", 0, 15, agent=agent)
    assert updates == [1]
    assert r.episodes == 5


def test_recipe_plus1_keeps_one_bit_more_than_the_probe(env):
    r = run_tuner("recipe-plus1", env, 0, "6x", 0, 3)
    p = env.probe_result
    feasible = [b for b, s in p.required.items() if s is not None]
    assert r.test["bits"] == pytest.approx(min(p.recipe_bits + 1, max(feasible)))


def test_sensitivity_allocates_per_layer_and_meets_the_budget(env):
    r = run_tuner("sensitivity", env, 0, "6x", 0, 3)
    assert len(r.config["bits"]) == len(r.config["sparsity"]) == 2          # one per layer of the 13-16-3 MLP
    assert len(set(r.config["bits"])) == 1                                  # one width: per-layer widths measured worse
    assert r.test["packed_bytes"] <= env.meter.limit and r.stages_used == 3


def test_sensitivity_pick_plays_the_probes_own_width_from_PICK_MIN_BITS_up(env, monkeypatch):
    import rltune.tuners as T
    from rltune.env import nearest_feasible

    plus1 = run_tuner("sensitivity", env, 0, "6x", 0, 3)
    assert nearest_feasible(env.probe_result, env.probe_result.recipe_bits + 1) != env.probe_result.recipe_bits  # two widths to tell apart
    monkeypatch.setattr(T, "PICK_MIN_BITS", 99)  # a pick below the threshold: one bit more, the sensitivity rule's episode
    high = run_tuner("sensitivity-pick", env, 0, "6x", 0, 3)
    assert high.config["bits"] == plus1.config["bits"] and high.val_acc == plus1.val_acc
    monkeypatch.setattr(T, "PICK_MIN_BITS", 0)  # at or above it: the probe's own pick
    low = run_tuner("sensitivity-pick", env, 0, "6x", 0, 3)
    pick = env.probe_result.recipe_bits
    assert set(low.config["bits"]) == {pick} and low.config["width_rule"] == "pick"
    assert set(plus1.config["bits"]) == {nearest_feasible(env.probe_result, pick + 1)}
    assert low.test["packed_bytes"] <= env.meter.limit and low.stages_used == 3


def test_owl_tilts_sparsity_away_from_the_outlier_heavy_layer_and_meets_the_budget(env):
    r = run_tuner("owl", env, 0, "6x", 0, 3)
    sps, ratios, centres = r.config["sparsity"], r.config["outlier_ratios"], r.config["centres"]
    assert len(sps) == len(ratios) == len(centres) == 2
    tilt = [s_ - c for s_, c in zip(sps, centres)]
    if ratios[0] != ratios[1] and min(sps) > 0:   # the layer with more outliers is pruned less, by 2λ
        more = max(range(2), key=lambda i: ratios[i])
        assert tilt[1 - more] - tilt[more] == pytest.approx(0.16, abs=1e-6)
    assert r.test["packed_bytes"] <= env.meter.limit and r.stages_used == 3


def test_owl_allocation_meets_the_limit_it_is_given():
    import torch
    from torch import nn

    from rltune import compression as C
    from rltune.layer_sensitivity import owl_allocate

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    with torch.no_grad():
        m[2].weight[:, :4] *= 20          # outliers in the second layer
    cost = lambda model: sum(int((l.compressor.mask).sum()) for l in C.layers(model))  # noqa: E731 - kept weights
    limit = 0.3 * sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))
    sps, info = owl_allocate(m, cost, limit, 4)
    assert info["outlier_ratios"][1] > info["outlier_ratios"][0] and sps[1] < sps[0]
    probe = C.prepare_(m)
    C.prune_layers_(probe, sps)
    assert cost(probe) <= limit


def _mlp_and_val():
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(256, 20)
    y = m(x).argmax(dim=1)
    return m, (x, y)


def test_allocator_keeps_every_layer_within_its_trust_region_and_under_the_limit():
    from rltune import compression as C
    from rltune.layer_sensitivity import allocate

    m, val = _mlp_and_val()
    cost = lambda model: sum(int(l.compressor.mask.sum()) for l in C.layers(model))  # noqa: E731 - kept weights
    total = sum(l.weight.numel() for l in C.layers(C.prepare_(copy.deepcopy(m))))
    centres = [0.6, 0.8, 0.4]
    bits, sps, info = allocate(m, None, cost, 0.35 * total, bits=(4,), val=val, around=centres, radius=0.05)
    assert bits == (4, 4, 4) and info.get("fallback") is None
    assert all(abs(s - c) <= 0.05 + 1e-9 for s, c in zip(sps, centres))
    probe = C.prepare_(copy.deepcopy(m))
    C.prune_layers_(probe, sps)
    assert cost(probe) <= 0.35 * total


def test_allocator_tops_a_pick_under_the_limit_up_to_it_within_the_trust_region():
    from rltune import compression as C
    from rltune.layer_sensitivity import allocate

    m, val = _mlp_and_val()
    cost = lambda model: sum(int(l.compressor.mask.sum()) for l in C.layers(model))  # noqa: E731 - kept weights
    total = sum(l.weight.numel() for l in C.layers(C.prepare_(copy.deepcopy(m))))
    centres = [0.6, 0.8, 0.4]
    # a limit between the grid's options: one-shot picks land under it, the top-up brings the plan to it
    limit = 0.3333 * total
    _, sps, info = allocate(m, None, cost, limit, bits=(4,), val=val, around=centres, radius=0.05)
    probe = C.prepare_(copy.deepcopy(m))
    C.prune_layers_(probe, sps)
    assert 0.99 * limit <= cost(probe) <= limit and info["cost"] == cost(probe)
    assert all(s >= c - 0.05 - 1e-9 for s, c in zip(sps, centres))
    # without a trust region the shift is bounded by the radius alone
    _, free, info = allocate(m, None, cost, limit, bits=(4,), val=val)
    probe = C.prepare_(copy.deepcopy(m))
    C.prune_layers_(probe, free)
    assert info["cost"] == cost(probe) <= limit and (info["top_up"] < 0 or cost(probe) >= 0.995 * limit)
    # a limit no option in the trust region reaches from below: the floors hold, under the limit
    _, low, info = allocate(m, None, cost, 0.5 * total, bits=(4,), val=val, around=centres, radius=0.05)
    assert all(abs(s - c) <= 0.05 + 1e-9 for s, c in zip(low, centres)) and info["cost"] <= 0.5 * total


def test_allocator_keeps_the_head_no_sparser_than_the_model_and_8_weights_a_row():
    from rltune import compression as C
    from rltune.layer_sensitivity import allocate

    m, val = _mlp_and_val()
    cost = lambda model: sum(int(l.compressor.mask.sum()) for l in C.layers(model))  # noqa: E731
    total = sum(l.weight.numel() for l in C.layers(C.prepare_(copy.deepcopy(m))))
    centres = [0.5, 0.5, 0.9]  # the head (32 -> 5) asked to be far sparser than the rest
    sizes = [20 * 64, 64 * 32, 32 * 5]
    overall = sum(c * n for c, n in zip(centres, sizes)) / sum(sizes)
    _, sps, _ = allocate(m, None, cost, 0.6 * total, bits=(4,), val=val, around=centres, radius=0.05)
    assert sps[-1] <= overall + 1e-6 and sps[-1] <= 1 - 8 / 32
    _, free, _ = allocate(m, None, cost, 0.6 * total, bits=(4,), val=val, around=centres, radius=0.05, head_keep=0)
    assert free[-1] >= 0.85  # without the rule the head stays near its centre
    # a budget only the sparse head can meet: the rule gives way rather than break the budget
    _, tight, info = allocate(m, None, cost, 1540, bits=(4,), val=val, around=centres, radius=0.05)
    assert info.get("fallback") is None and tight[-1] >= 0.85 and info["cost"] <= 1540


def test_allocator_falls_back_to_its_centres_never_to_an_infeasible_pick():
    from rltune import compression as C
    from rltune.layer_sensitivity import allocate

    m, val = _mlp_and_val()
    cost = lambda model: sum(int(l.compressor.mask.sum()) for l in C.layers(model))  # noqa: E731
    total = sum(l.weight.numel() for l in C.layers(C.prepare_(copy.deepcopy(m))))
    # 5 % of the weights cannot be reached within 0.05 of 50 % sparsity: the centres come back
    bits, sps, info = allocate(m, None, cost, 0.05 * total, bits=(4,), val=val, around=0.5, radius=0.05)
    assert info["fallback"] == "uniform" and sps == (0.5, 0.5, 0.5) and bits == (4, 4, 4)


def test_sensitivity_starts_from_the_recipes_magnitude_split(env):
    from rltune.tuners import magnitude_split

    env.reset(seed=0, options={"scenario": 0, "target": "6x"})
    fs, _ = env.float_student(0, env.float_seed)
    split = magnitude_split(fs, 0.7, env.ctx.scenario)
    n = [l.weight.numel() for l in C.layers(C.prepare_(copy.deepcopy(fs)))]
    assert len(split) == len(n) and sum(s * k for s, k in zip(split, n)) / sum(n) == pytest.approx(0.7, abs=0.01)
