"""RL transfer on MinAtar: padding, replay, the DQN update and target sync, the RL zoo through
``zootune.Zoo``, the same ZooTuning class as classification, the ``zootune rl`` CLI and a tiny run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("minatar")

import zootune.cli.main as cli
from zootune.errors import CheckpointError, ZootuneError
from zootune.methods.registry import DEFAULT_RL_METHODS, build_method
from zootune.methods.zoo_tuning import ZooTuning
from zootune.rl import (
    GAMES,
    DQNConfig,
    DQNLearner,
    MinAtarQNet,
    ReplayBuffer,
    RLRunConfig,
    RLTask,
    build_q_network,
    build_rl_zoo,
    epsilon_at,
    load_agents,
    load_rl_zoo,
    make_env,
    minatar_qnet,
    pad_observation,
    run_rl_transfer,
    train_dqn,
)
from zootune.rl.dqn import update_schedule
from zootune.rl.transfer import AGGREGATE_CHOICES, rl_methods
from zootune.rl.envs import env_seeds, observe
from zootune.rl.zoo import rl_zoo_dir
from zootune.tasks import ClassificationTask
from zootune.zoo import Zoo, save_state_dict

OBS = (10, 10, 10)
TINY = dict(batch_size=4, learning_starts=0, train_every=1, eval_every=0, replay_capacity=64)


def random_transitions(n: int, seed: int = 0):
    """n transitions, each as the arrays of a one-environment step (one row each)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield (rng.integers(0, 2, (1, *OBS)).astype(np.uint8), np.array([rng.integers(6)]),
               np.array([float(rng.integers(0, 2))]), rng.integers(0, 2, (1, *OBS)).astype(np.uint8),
               np.array([i % 5 == 4]))


def add_one(buffer: ReplayBuffer, obs, action, reward, next_obs, done) -> None:
    buffer.add(obs[None], [action], [reward], next_obs[None], [done])


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_zoo(n: int = 3) -> Zoo:
    members = []
    for i in range(n):
        torch.manual_seed(100 + i)
        members.append(MinAtarQNet())
    return Zoo.from_modules(members, [f"g{i}" for i in range(n)])


# ------------------------------------------------------------------ environments and padding

def test_padded_observations_of_every_game_have_the_common_shape():
    for game in GAMES:
        env = make_env(game, seed=0)
        for action in (0, 1, 3, 5):
            env.act(action)
        state = env.state()
        padded = observe(env)
        assert padded.shape == OBS and padded.dtype == np.uint8
        channels = state.shape[2]
        # channel c of the padding is channel c of the game; the rest is zero
        for c in range(10):
            expected = state[:, :, c].astype(np.uint8) if c < channels else np.zeros((10, 10), np.uint8)
            assert np.array_equal(padded[c], expected), (game, c)
    with pytest.raises(ZootuneError, match="unknown MinAtar game"):
        make_env("pong", seed=0)
    with pytest.raises(ZootuneError):
        pad_observation(np.zeros((10, 10, 11), bool))


# ------------------------------------------------------------------ replay buffer

def test_replay_buffer_samples_only_stored_transitions_and_wraps_at_capacity():
    buffer = ReplayBuffer(5, OBS)
    rng = np.random.default_rng(0)
    for i in range(3):  # rewards 1, 2, 3 identify the transitions
        add_one(buffer, np.full(OBS, i, np.uint8), i, float(i + 1), np.full(OBS, i + 1, np.uint8), False)
    assert len(buffer) == 3
    batch = buffer.sample(200, rng)
    assert set(batch["reward"].tolist()) <= {1.0, 2.0, 3.0}  # unwritten zero slots never drawn
    assert set(batch["reward"].tolist()) == {1.0, 2.0, 3.0}
    for i in range(3, 7):
        add_one(buffer, np.full(OBS, i, np.uint8), i % 6, float(i + 1), np.full(OBS, i + 1, np.uint8), i == 6)
    # 7 transitions into 5 slots: the two oldest (rewards 1, 2) are overwritten in place
    assert len(buffer) == 5 and buffer.position == 2
    assert buffer.rewards.tolist() == [6.0, 7.0, 3.0, 4.0, 5.0]
    batch = buffer.sample(300, rng)
    assert set(batch["reward"].tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}
    # each sampled row is one stored transition (obs, next_obs, reward stay together)
    ident = batch["obs"][:, 0, 0, 0]
    assert torch.equal(batch["reward"], ident + 1) and torch.equal(batch["next_obs"][:, 0, 0, 0], ident + 1)
    assert torch.equal(batch["done"], (ident == 6).float())


def test_replay_buffer_stores_a_batch_as_consecutive_rows_like_one_by_one_adds():
    columns = [np.concatenate(c) for c in zip(*random_transitions(11, seed=4))]
    batched, single = ReplayBuffer(7, OBS), ReplayBuffer(7, OBS)
    for start, stop in ((0, 3), (3, 8), (8, 11)):  # the second batch wraps around the end
        batched.add(*(c[start:stop] for c in columns))
    for row in zip(*columns):
        add_one(single, *row)
    assert (batched.position, len(batched)) == (single.position, len(single)) == (4, 7)
    for name in ("observations", "actions", "rewards", "next_observations", "dones"):
        assert np.array_equal(getattr(batched, name), getattr(single, name)), name
    oversized = ReplayBuffer(3, OBS)
    oversized.add(*columns)  # 11 rows into 3 slots: the last 3 are kept
    assert sorted(oversized.rewards.tolist()) == sorted(columns[2][-3:].tolist())


# ------------------------------------------------------------------ DQN

def test_epsilon_decays_linearly_then_stays():
    cfg = DQNConfig(eps_start=1.0, eps_end=0.1, eps_decay_steps=100)
    assert epsilon_at(0, cfg) == 1.0 and math.isclose(epsilon_at(50, cfg), 0.55)
    assert math.isclose(epsilon_at(100, cfg), 0.1) and math.isclose(epsilon_at(10_000, cfg), 0.1)


def test_dqn_update_changes_the_q_network_not_the_target_and_matches_a_naive_loss():
    torch.manual_seed(0)
    learner = DQNLearner(MinAtarQNet(), DQNConfig(**{**TINY, "learning_starts": 1000}), seed=0)
    for t in random_transitions(8):
        learner.observe(*t)
    assert learner.updates == 0  # before learning_starts nothing is trained
    online_before, target_before = params(learner.online), params(learner.target)
    assert same(online_before, target_before)
    batch = learner.replay.sample(6, np.random.default_rng(1))
    # naive reference: y = r + gamma (1 - done) max_a' Q_target(s', a'), Huber on Q(s, a) - y
    with torch.no_grad():
        q = learner.online(batch["obs"])
        y = batch["reward"] + 0.99 * (1 - batch["done"]) * learner.target(batch["next_obs"]).max(1).values
        d = torch.stack([q[i, batch["action"][i]] for i in range(6)]) - y
        expected = torch.where(d.abs() <= 1, 0.5 * d ** 2, d.abs() - 0.5).mean()
    loss = learner.update(batch)
    assert math.isclose(loss, float(expected), rel_tol=1e-5)
    assert not same(params(learner.online), online_before)
    assert same(params(learner.target), target_before)


def test_target_network_equals_online_exactly_right_after_each_sync_step_and_not_before():
    torch.manual_seed(0)
    learner = DQNLearner(MinAtarQNet(), DQNConfig(**{**TINY, "target_update": 3}), seed=0)
    for step, transition in enumerate(random_transitions(10), start=1):
        learner.observe(*transition)
        equal = same(params(learner.online), params(learner.target))
        assert equal == (step % 3 == 0), step
    assert learner.syncs == 3 and learner.updates == 10


def test_rl_task_loss_and_metric():
    task = RLTask()
    outputs = torch.tensor([[0.0, 2.0, 0.0, 0, 0, 0], [1.0, 0.0, 0.0, 0, 0, 0]])
    targets = torch.tensor([[1.0, 0.5], [0.0, 0.8]])  # |d| = 1.5 (linear part), 0.2 (quadratic part)
    assert math.isclose(float(task.loss(outputs, targets)), ((1.5 - 0.5) + 0.5 * 0.2 ** 2) / 2, rel_tol=1e-6)
    total, count = task.metric_sums(outputs, targets)
    assert math.isclose(total, 1.7, rel_tol=1e-6) and count == 2
    with pytest.raises(ZootuneError):
        task.check_targets(torch.tensor([[6.0, 0.0]]))


def test_same_seed_gives_the_same_training_run():
    cfg = DQNConfig(steps=120, batch_size=4, learning_starts=20, target_update=30, eval_every=60, eval_episodes=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        result = train_dqn(MinAtarQNet(), "breakout", cfg, seed=3)
        runs.append((result.episodes, result.curve, params(result.model)))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] and same(runs[0][2], runs[1][2])
    assert len(runs[0][1]) == 2 and [s for s, _ in runs[0][1]] == [60, 120]


class IntegerPolicy(nn.Module):
    """A fixed Q-network with integer weights: its values are exact sums, the same in any batch, so
    its greedy actions cannot depend on how observations are batched."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1000, 6)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randint(-3, 4, (6, 1000), generator=generator).float())
            self.linear.bias.copy_(torch.arange(6.0) * 0.5)

    def forward(self, x):
        return self.linear(x.flatten(1))


def recorded_transitions(monkeypatch, num_envs: int, seed: int, steps: int):
    """Everything ``DQNLearner.observe`` receives in a greedy, non-learning ``train_dqn`` run:
    a list (one entry per vector step) of (obs, action, reward, next_obs, done) arrays."""
    calls = []
    original = DQNLearner.observe

    def observe(self, *arrays):
        calls.append([np.array(a, copy=True) for a in arrays])
        original(self, *arrays)

    monkeypatch.setattr(DQNLearner, "observe", observe)
    cfg = DQNConfig(steps=steps, num_envs=num_envs, eps_start=0.0, eps_end=0.0, learning_starts=10 * steps,
                    eval_every=0, replay_capacity=steps)
    result = train_dqn(IntegerPolicy(), "asterix", cfg, seed=seed)
    monkeypatch.setattr(DQNLearner, "observe", original)
    return calls, result


def check_against_a_plain_environment_loop(transitions, seed: int) -> None:
    """The recorded one-environment transitions are those of MinAtar played by hand with their
    actions: the state before, the reward, the end flag and the state after (terminal included)."""
    env = make_env("asterix", seed)
    for obs, action, reward, next_obs, done in transitions:
        assert np.array_equal(obs[0], observe(env))
        r, d = env.act(int(action[0]))
        assert (reward[0], done[0]) == (r, d) and np.array_equal(next_obs[0], observe(env))
        if d:
            env.reset()


def test_vectorised_acting_gives_the_transitions_of_independent_single_environment_runs(monkeypatch):
    steps = 120
    vector, vector_result = recorded_transitions(monkeypatch, 3, seed=5, steps=3 * steps)
    assert len(vector) == steps and all(len(call[0]) == 3 for call in vector)
    episode_returns = []
    for i, env_seed in enumerate(env_seeds(5, 3)):
        single, single_result = recorded_transitions(monkeypatch, 1, seed=env_seed, steps=steps)
        for t in range(steps):  # row i of vector step t is step t of the single run of environment i's seed
            for column, (batched, alone) in enumerate(zip(vector[t], single[t])):
                assert np.array_equal(batched[i], alone[0]), (i, t, column)
        episode_returns += [r for _, r in single_result.episodes]
        assert any(call[4][0] for call in single), "the run should cross an episode end (auto-reset)"
        check_against_a_plain_environment_loop(single, env_seed)
    assert sorted(r for _, r in vector_result.episodes) == sorted(episode_returns)
    assert env_seeds(5, 1) == [5]  # one environment: the single run of the same seed


@pytest.mark.parametrize("num_envs", [1, 3, 8, 16])
def test_the_replay_ratio_is_batch_size_over_train_every_for_any_number_of_environments(monkeypatch, num_envs):
    drawn = []
    original = ReplayBuffer.sample
    monkeypatch.setattr(ReplayBuffer, "sample", lambda self, n, rng: drawn.append(n) or original(self, n, rng))
    cfg = DQNConfig(steps=480, num_envs=num_envs, batch_size=4, train_every=4, learning_starts=0, eval_every=0,
                    target_update=1000, replay_capacity=500)
    result = train_dqn(MinAtarQNet(), "breakout", cfg, seed=0)
    period, batch, lr = update_schedule(cfg)
    assert result.steps == 480 and sum(drawn) == result.samples
    assert sum(drawn) / result.steps == cfg.batch_size / cfg.train_every == batch / period  # 1 sample per step
    assert set(drawn) == {batch} and len(drawn) == result.updates == 480 // period
    if num_envs == 1:  # the reference loop: batch_size every train_every steps at lr
        assert (period, batch, lr) == (cfg.train_every, cfg.batch_size, cfg.lr)
    assert lr == cfg.lr * batch / cfg.batch_size  # linear scaling: the same rate per sample
    assert {group["lr"] for group in DQNLearner(MinAtarQNet(), cfg).optimizer.param_groups} == {lr}
    # learning_starts counts environment steps: no sample before it, the same ratio after it
    drawn.clear()
    late = train_dqn(MinAtarQNet(), "breakout", replace(cfg, learning_starts=240), seed=0)
    assert sum(drawn) == late.samples == (480 - 240) * cfg.batch_size // cfg.train_every


# ------------------------------------------------------------------ zoo and methods

def test_rl_zoo_loads_through_zootune_zoo(tmp_path):
    agents = {}
    for i, name in enumerate(["asterix", "freeway", "seaquest"]):
        torch.manual_seed(i)
        agents[name] = MinAtarQNet()
    save_state_dict(tmp_path / "asterix.safetensors", agents["asterix"].state_dict())
    save_state_dict(tmp_path / "freeway.safetensors", agents["freeway"].state_dict())
    torch.save({"state_dict": agents["seaquest"].state_dict(), "step": 5}, tmp_path / "seaquest.pt")
    paths = [tmp_path / "asterix.safetensors", tmp_path / "freeway.safetensors", tmp_path / "seaquest.pt"]
    zoo = Zoo.from_checkpoints(paths, arch=minatar_qnet, keep_head=True)
    assert zoo.names == ["asterix", "freeway", "seaquest"] and zoo.head_name == "head"
    for name, member in zoo.items():
        assert isinstance(member, MinAtarQNet) and same(params(member), params(agents[name]))
    assert load_agents(paths).names == zoo.names
    (tmp_path / "broken.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError):
        load_agents([tmp_path / "broken.safetensors"])


def test_rl_zoo_cache_builds_checks_checksums_and_holds_out_the_target(tmp_path):
    cfg = DQNConfig(steps=40, batch_size=4, learning_starts=10, target_update=20, eval_every=0, eval_episodes=1,
                    max_eval_episode_steps=50)
    zoo, rows = load_rl_zoo("breakout", cfg, cache_dir=tmp_path, log=lambda m: None)
    assert zoo.names == ["asterix", "freeway", "seaquest", "space_invaders"]
    folder = rl_zoo_dir(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(r["game"] for r in manifest["agents"].values()) == zoo.names
    again = build_rl_zoo(zoo.names, cfg, cache_dir=tmp_path, log=lambda m: None)  # cached: same files
    assert [r["sha256"] for r in again] == [r["sha256"] for r in rows]
    (folder / rows[0]["file"]).write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="asterix"):
        load_rl_zoo("breakout", cfg, cache_dir=tmp_path, build_if_missing=False)


def test_agents_of_several_environments_have_their_own_file_and_old_rows_count_as_one():
    from zootune.rl.zoo import _trained_with, agent_file

    cfg = DQNConfig(steps=300)
    assert agent_file("asterix", cfg, 0) == "asterix-300steps-seed0.safetensors"  # the name before num_envs
    assert agent_file("asterix", replace(cfg, num_envs=16), 0) == "asterix-300steps-seed0-16envs.safetensors"
    newer = ("num_envs", "stop_patience", "stop_min_gain", "stop_min_steps")
    old_row = {"dqn": {k: v for k, v in cfg.to_dict().items() if k not in newer}}
    assert _trained_with(old_row) == cfg.to_dict() != replace(cfg, num_envs=16).to_dict()
    assert _trained_with(old_row) != replace(cfg, stop_patience=2).to_dict()  # an early-stopped agent is another


def naive_plateaued(returns, patience, min_gain):
    """The rule written out: two-point running means; stop when the last ``patience`` of them are
    all below the best earlier one plus ``min_gain`` of its size."""
    if patience == 0 or len(returns) < patience + 2:
        return False
    smooth = [returns[0]] + [(returns[k - 1] + returns[k]) / 2 for k in range(1, len(returns))]
    earlier, recent = smooth[:len(smooth) - patience], smooth[len(smooth) - patience:]
    return all(value < max(earlier) + min_gain * abs(max(earlier)) for value in recent)


def test_the_plateau_rule_matches_its_definition_and_stops_only_flat_curves():
    from zootune.rl.dqn import plateaued

    rng = np.random.default_rng(0)
    for _ in range(300):
        returns = list(rng.choice([0.0, 1.0, 2.0, 5.0, -1.0], size=int(rng.integers(1, 12))))
        patience, gain = int(rng.integers(0, 5)), float(rng.choice([0.0, 0.05, 0.5]))
        assert plateaued(returns, patience, gain) == naive_plateaued(returns, patience, gain), (returns, patience)
    assert not plateaued([1, 2, 3, 4, 5, 6, 7, 8], 3, 0.05)  # still rising
    assert plateaued([1, 5, 10, 10, 10, 10, 10, 10], 3, 0.05)  # flat for 3 evaluations
    assert not plateaued([1, 5, 10, 10, 10, 10, 10, 11.2], 3, 0.05)  # the last mean of two gained > 5%


def test_training_stops_at_the_first_plateaued_evaluation_past_the_minimum(monkeypatch):
    import zootune.rl.dqn as dqn

    # smoothed returns 1, 1.5, 2.5, 3, 3, 3, ...: the first plateau (patience 2, 5%) is the 6th evaluation
    for minimum, stop in ((0, 300), (400, 400)):
        scripted = iter([1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
        monkeypatch.setattr(dqn, "evaluate_policy", lambda *a, **k: [next(scripted)])
        cfg = DQNConfig(steps=1_000, num_envs=2, batch_size=4, learning_starts=10, target_update=50, eval_every=50,
                        stop_patience=2, stop_min_steps=minimum)
        result = train_dqn(MinAtarQNet(), "breakout", cfg, seed=0)
        assert result.steps == stop and [s for s, _ in result.curve] == list(range(50, stop + 1, 50))
        assert result.updates > 0
    with pytest.raises(ZootuneError, match="eval_every"):
        DQNConfig(stop_patience=2, eval_every=0)
    with pytest.raises(ZootuneError, match="stop_patience"):
        DQNConfig(stop_patience=-1)
    with pytest.raises(ZootuneError, match="stop_min_gain"):
        DQNConfig(stop_min_gain=-0.1)


def test_rl_path_builds_the_same_zoo_tuning_class_as_classification_and_trains_through_it():
    zoo = tiny_zoo()
    task = RLTask()
    rl_model = build_q_network("zoo-tuning", zoo, task, seed=0)
    classifier = build_method("zoo-tuning", zoo, ClassificationTask(3))
    assert type(rl_model) is type(classifier) is ZooTuning
    assert rl_model.model.head.out_features == 6 and list(rl_model.aggregated_layers()) == ["conv"]
    wide = build_q_network("zoo-tuning", zoo, task, seed=0, aggregate="conv+linear")
    assert list(wide.aggregated_layers()) == ["conv", "hidden"]
    before = params(rl_model)
    cfg = DQNConfig(steps=30, batch_size=4, learning_starts=10, target_update=10, eval_every=0)
    result = train_dqn(rl_model, "space_invaders", cfg, seed=0, task=task)
    assert result.model is rl_model and result.updates == 5 and result.syncs == 3
    assert not same(params(rl_model), before)
    # Lite: DQN through the Lite module, then its folded plain Q-network computes the same values
    lite = build_q_network("lite", zoo, task, seed=0)
    folded = train_dqn(lite, "space_invaders", cfg, seed=0, task=task).model
    assert type(folded) is MinAtarQNet
    x = torch.from_numpy(np.concatenate([t[0] for t in random_transitions(4)])).float()
    lite.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), lite(x), rtol=1e-4, atol=1e-5)


def old_chain(method: str, zoo, task, seed: int, aggregate=(nn.Conv2d,), member=None):
    """The if-chain rl/transfer.py built Q-networks with before the registry path (kept as the
    reference the registry path must equal)."""
    torch.manual_seed(seed)
    if method == "scratch":
        return build_method("finetune", [minatar_qnet(task.num_actions)], task)
    if method == "finetune":
        return build_method("finetune", zoo, task, member=member)
    return build_method(method, zoo, task, options={"target_types": aggregate})


def test_the_registry_path_builds_the_q_networks_the_old_chain_built():
    zoo, task, seed = tiny_zoo(), RLTask(), 11
    for method, member in (("finetune", 1), ("zoo-tuning", None), ("lite", None)):
        for aggregate in ("conv", "conv+linear"):
            new = build_q_network(method, zoo, task, seed=seed, aggregate=aggregate, member=member)
            old = old_chain(method, zoo, task, seed, AGGREGATE_CHOICES[aggregate], member)
            assert type(new) is type(old) and same(params(new), params(old)), (method, aggregate)
    # scratch: the same fresh backbone drawn from the seed; the new head is now drawn from the seed
    # itself (the registry's scratch builds the fresh net on a forked generator) -- same shape and scale
    new, old = build_q_network("scratch", zoo, task, seed=seed), old_chain("scratch", zoo, task, seed)
    assert type(new) is type(old) and params(new).keys() == params(old).keys()
    assert all(torch.equal(v, params(old)[k]) for k, v in params(new).items() if not k.startswith("model.head"))
    assert new.model.head.weight.shape == old.model.head.weight.shape and new.model.head.weight.abs().max() < 0.1


def test_the_robust_default_starts_on_the_source_with_the_best_zero_shot_return():
    assert DEFAULT_RL_METHODS == tuple(RLRunConfig().methods) and set(DEFAULT_RL_METHODS) <= set(rl_methods(RLTask()))
    zoo, task, scores = tiny_zoo(), RLTask(), [0.4, 0.6, 0.6]  # a tie: the first of the best (member 1)
    robust = build_q_network("zoo-tuning", zoo, task, seed=3, member_scores=scores)
    best = build_q_network("finetune", zoo, task, seed=3, member=1)
    assert robust.config.variant == "robust" and robust.config.start_member == 1
    x = torch.from_numpy(np.concatenate([t[0] for t in random_transitions(5)])).float()
    robust.eval(), best.eval()
    with torch.no_grad():  # step 0 is the best source with the same new head
        torch.testing.assert_close(robust(x), best(x), rtol=1e-5, atol=1e-6)
    without = build_q_network("zoo-tuning", zoo, task, seed=3)  # no ranking: the paper's uniform start
    assert without.config.start_member is None


# ------------------------------------------------------------------ CLI and a tiny run

def test_cli_rl_bad_input_is_one_line_and_nonzero(capsys, tmp_path):
    for argv, fragment in ((["rl", "--game", "pong"], "unknown MinAtar game 'pong'"),
                           (["rl", "--steps", "-5"], "--steps"),
                           (["rl", "--methods", "scratch,magic"], "unknown RL method 'magic'")):
        code = cli.main(argv + ["--out", str(tmp_path), "--cache-dir", str(tmp_path)])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("zootune: error: "), err
        assert fragment in lines[0]


def test_tiny_rl_run_writes_curves_and_results(tmp_path):
    out = tmp_path / "out"
    short = {"batch_size": 8, "learning_starts": 20, "target_update": 50, "eval_episodes": 1,
             "max_eval_episode_steps": 100, "replay_capacity": 500}
    config = RLRunConfig.quick(
        game="space_invaders", seeds=[0, 1], methods=["scratch", "finetune", "lite"],
        dqn=DQNConfig(steps=100, eval_every=10, **short),
        source_dqn=DQNConfig(steps=64, num_envs=4, eval_every=0, **short),
        selection_episodes=2, final_episodes=2, progress=False, cache_dir=str(tmp_path / "cache"),
        finetune_each=True)
    results = run_rl_transfer(config, out, log=lambda message: None)
    assert json.loads((out / "results.json").read_text())["methods"] == json.loads(json.dumps(results["methods"]))
    results = json.loads((out / "results.json").read_text())
    assert results["game"] == "space_invaders" and "space_invaders" not in results["zoo"]["names"]
    assert results["best_source"] == max(results["selection"], key=results["selection"].get)
    assert [m["id"] for m in results["methods"]] == ["scratch", "finetune-best", "lite"] + [
        f"finetune-{name}" for name in results["zoo"]["names"] if name != results["best_source"]]  # best once
    assert results["methods"][1]["member"] == results["best_source"]
    lines = (out / "curves.csv").read_text().splitlines()
    assert lines[0] == "method,seed,step,mean_return" and len(lines) == 1 + 6 * 2 * 10  # eval every 10 steps
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    for method in results["methods"]:
        assert len(method["final"]) == 2
        assert math.isclose(method["mean"], float(np.mean(method["final"])), rel_tol=1e-9)
        assert math.isclose(method["std"], float(np.std(method["final"], ddof=1)), rel_tol=1e-9, abs_tol=1e-12)
        last = [r["mean_return"] for r in rows if r["method"] == method["id"] and r["step"] == 100]
        assert math.isclose(method["curve"][-1]["mean"], float(np.mean(last)), rel_tol=1e-9)
        areas = [np.mean([r["mean_return"] for r in rows if r["method"] == method["id"] and r["seed"] == seed])
                 for seed in (0, 1)]  # the area under each seed's curve: its mean over the evaluations
        assert np.allclose(method["auc"], areas) and math.isclose(method["auc_mean"], float(np.mean(areas)))
        spread = float(np.std(areas, ddof=1))  # 2 seeds: t(0.975, 1) = 12.706
        assert math.isclose(method["auc_ci95"], 12.7062 * spread / math.sqrt(2), rel_tol=1e-4, abs_tol=1e-9)
    markdown = (out / "results.md").read_text()
    assert f"finetune [{results['best_source']}] (zero-shot best)" in markdown and "| lite |" in markdown
    pytest.importorskip("matplotlib")
    assert (out / "learning_curves.png").stat().st_size > 0


def test_runs_of_one_game_merge_into_one_table_and_other_games_are_refused():
    from zootune.rl.transfer import merge_results, results_markdown, source_agents_markdown

    def run(ids, seeds, game="breakout"):
        methods = [{"id": i, "label": i, "final": [1.0] * len(seeds), "seconds": [1.0] * len(seeds), "mean": 1.0,
                    "std": 0.0, "ci95": 0.0, "auc_mean": 0.5, "auc_ci95": 0.0, "curve": [],
                    "curves": {str(s): [[10, 0.5]] for s in seeds}} for i in ids]
        agent = {"game": "asterix", "steps": 100, "steps_trained": 60, "eval_return": 2.5, "curve": [[50, 1.0]]}
        return {"game": game, "zoo": {"names": ["asterix"], "agents": [agent]}, "selection": {"asterix": 0.5},
                "best_source": "asterix", "seeds": seeds, "methods": methods, "seconds": 10.0,
                "config": {"dqn": {"steps": 100, "eval_episodes": 1, "eval_every": 10, "eval_epsilon": 0.05},
                           "source_dqn": {"eval_episodes": 10, "eval_every": 50}, "final_episodes": 2}}

    merged = merge_results([run(["scratch", "finetune-best"], [0, 1]), run(["finetune-best", "lite-paper"], [0, 1, 2])])
    assert [m["id"] for m in merged["methods"]] == ["scratch", "finetune-best", "lite-paper"]
    assert len(merged["methods"][1]["final"]) == 2  # the first run's row of a repeated id is kept
    assert merged["seeds"] == [0, 1, 2] and merged["seconds"] == 20.0
    markdown = results_markdown(merged)
    assert "| lite-paper | 0.50 | 1.00 | 3 |" in markdown  # a row says how many seeds it has
    assert "| asterix | 60 | 2.50 | 1.0 |" in source_agents_markdown(merged["zoo"]["agents"])
    with pytest.raises(ZootuneError, match="share the game"):
        merge_results([run(["scratch"], [0]), run(["lite"], [0], game="asterix")])


def test_cli_rl_options_reach_the_run_config(monkeypatch, tmp_path, capsys):
    import zootune.rl

    seen = {}
    monkeypatch.setattr(zootune.rl, "run_rl_transfer", lambda config, out: seen.update(config=config, out=out))
    argv = ["rl", "--quick", "--game", "freeway", "--steps", "300", "--source-steps", "80", "--seeds", "2",
            "--methods", "scratch,lite", "--aggregate", "conv+linear", "--envs", "4", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 0
    config = seen["config"]
    assert config.game == "freeway" and config.seeds == [0, 1] and config.methods == ["scratch", "lite"]
    assert config.aggregate == "conv+linear" and config.dqn.steps == 300 and config.dqn.eval_every == 30
    assert config.source_dqn.steps == 80 and config.dqn.eps_decay_steps <= 150
    assert config.source_dqn.stop_min_steps <= 80
    assert config.dqn.num_envs == config.source_dqn.num_envs == 4
    assert seen["out"] == tmp_path / "o"
