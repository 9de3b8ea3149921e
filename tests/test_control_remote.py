"""Policy server on loopback: refusals leave it healthy; RemotePolicy matches the local policy."""

import threading
import time

import msgpack
import numpy as np
import pytest
import torch
from _control_fakes import ConstantPolicy, FreezableProxy, tiny_dit
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from robodit.deploy.client import RemotePolicy, RemotePolicyError, healthz
from robodit.deploy.server import PolicyServer
from robodit.deploy.wire import pack, unpack

TOKEN = "test-token-0123456789abcdef"


class Counting(torch.nn.Module):
    """Wraps a policy, counts predict_action calls and can be made slow."""

    def __init__(self, policy):
        super().__init__()
        self.inner, self.calls, self.delay = policy, 0, 0.0
        for k in ("obs_shapes", "obs_horizon", "action_horizon", "n_action_steps", "action_dim", "name"):
            setattr(self, k, getattr(policy, k))

    @property
    def device(self):
        return self.inner.device

    def predict_action(self, obs, goal=None, generator=None):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.predict_action(obs, goal=goal, generator=generator)


@pytest.fixture(scope="module")
def server():
    policy = Counting(tiny_dit())
    with PolicyServer(policy, TOKEN, host="127.0.0.1", port=0) as srv:
        yield srv


def raw(server, token=TOKEN):
    return connect(server.url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=5)


def obs(b=1):
    return {"state": np.random.default_rng(0).normal(size=(b, 2, 5)).astype(np.float32)}


def test_remote_draws_the_noise_a_local_policy_would(server):
    """A generator travels as its state and comes back advanced, so the served policy samples exactly what the
    local one does from the same generators: one for the batch, or one per row as evaluation passes them (a
    list used to reach torch.randint: TypeError)."""
    local = server.policy.inner
    with RemotePolicy(server.url, TOKEN) as remote:
        assert remote.obs_shapes == {"state": ((5,), "float32")} and remote.action_horizon == 8
        g_remote, g_local = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = remote.predict_action(obs(2), generator=g_remote)
        assert a.shape == (2, 8, 3) and torch.equal(a, local.predict_action(obs(2), generator=g_local))
        assert torch.equal(g_remote.get_state(), g_local.get_state())  # advanced exactly as a local call does
        rows_remote = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
        rows_local = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
        for _ in range(2):  # the second call continues each row's generator where the first left it
            assert torch.equal(remote.predict_action(obs(3), generator=rows_remote),
                               local.predict_action(obs(3), generator=rows_local))
        assert all(torch.equal(r.get_state(), l.get_state()) for r, l in zip(rows_remote, rows_local))
        with pytest.raises(RemotePolicyError, match="2 generator states for a batch of 3"):
            remote.predict_action(obs(3), generator=rows_remote[:2])
        remote.meta["generator_state"] = False  # an older server: one seed per batch only
        with pytest.raises(RemotePolicyError, match="not a generator per row"):
            remote.predict_action(obs(3), generator=rows_remote)
        b = remote.predict_action(obs(2), generator=torch.Generator().manual_seed(3))
        assert torch.equal(b, remote.predict_action(obs(2), generator=torch.Generator().manual_seed(3)))
        assert remote.ping() < 1.0


def test_wrong_token_is_refused_before_any_work(server):
    calls, refused = server.policy.calls, server.stats["refused_auth"]
    with pytest.raises(RemotePolicyError, match="401"):
        RemotePolicy(server.url, "x" * 26)
    with pytest.raises(RemotePolicyError, match="401"):
        RemotePolicy(server.url, "")
    assert server.policy.calls == calls and server.stats["refused_auth"] == refused + 2
    assert healthz(server.url)["status"] == "ok"


@pytest.mark.parametrize("payload,code,words", [
    (b"\xc1\xff not msgpack", "malformed", "msgpack"),
    (msgpack.packb([1, 2, 3]), "malformed", "map"),
    (pack({"type": "infer", "obs": {"state": np.full((1, 2, 5), np.nan, np.float32)}}), "nonfinite", "'state'"),
    (pack({"type": "infer", "obs": {"state": np.zeros((1, 3, 5), np.float32)}}), "bad_shape", "[B, 2, 5]"),
    (pack({"type": "infer", "obs": {"state": np.zeros((1, 2, 5), np.int64)}}), "bad_dtype", "int64"),
    (pack({"type": "infer", "obs": {"stat": np.zeros((1, 2, 5), np.float32)}}), "bad_request", "missing ['state']"),
    (pack({"type": "infer", "obs": {"state": {"__ndarray__": 1, "dtype": "object", "shape": [1], "data": b"x"}}}),
     "bad_dtype", "object"),
    (pack({"type": "infer", "obs": {"state": {"__ndarray__": 1, "dtype": "float32", "shape": [1, 2, 5],
                                              "data": b"1234"}}}), "bad_shape", "needs 40 bytes"),
    (pack({"type": "launch"}), "bad_request", "unknown request type"),
    (pack({"type": "infer", "obs": obs(2), "generator": [{"device": "cpu", "state": np.zeros(5056, np.uint8)}]}),
     "bad_request", "1 generator states for a batch of 2"),
    (pack({"type": "infer", "obs": obs(), "generator": {"device": "cpu", "state": np.zeros(8, np.float32)}}),
     "bad_request", "1-d uint8 array"),
    (pack({"type": "infer", "obs": obs(), "generator": {"device": "cpu", "state": np.zeros(10, np.uint8)}}),
     "bad_request", "not a valid cpu generator state"),
    (pack({"type": "infer", "obs": obs(), "generator": {"device": "mps", "state": np.zeros(16, np.uint8)}}),
     "bad_request", "cannot be rebuilt on this server"),
    (pack({"type": "goal", "task": 3}), "bad_request", "'task' (text)"),
])
def test_bad_requests_get_a_named_error_and_the_connection_stays_usable(server, payload, code, words):
    calls = server.policy.calls
    with raw(server) as ws:
        ws.send(payload)
        reply = unpack(ws.recv(timeout=5))
        assert reply["type"] == "error" and reply["code"] == code and words in reply["error"], reply
        ws.send(pack({"type": "infer", "id": 7, "obs": obs()}))
        ok = unpack(ws.recv(timeout=10))
        assert ok["type"] == "action" and ok["id"] == 7 and ok["action"].shape == (1, 8, 3)
    assert server.policy.calls == calls + 1  # only the valid request reached the model


def test_text_frames_are_refused(server):
    with raw(server) as ws:
        ws.send("hello")
        assert unpack(ws.recv(timeout=5))["code"] == "malformed"


def test_oversized_request_is_refused_and_the_server_stays_healthy(server):
    big = pack({"type": "infer", "obs": {"state": np.zeros(server.max_request_bytes // 4 + 10, np.float32)}})
    with raw(server) as ws:
        ws.send(big)
        with pytest.raises(ConnectionClosed) as exc:
            ws.recv(timeout=5)
    assert exc.value.rcvd.code == 1009  # "message too big", refused by the websocket layer before buffering
    assert healthz(server.url)["status"] == "ok"
    with RemotePolicy(server.url, TOKEN) as remote:
        assert remote.predict_action(obs()).shape == (1, 8, 3)
        with pytest.raises(RemotePolicyError, match="limit"):  # the client refuses to send it in the first place
            remote.predict_action({"state": np.zeros((8, 2, 5), np.float32)}, goal={"x": np.zeros(10**6)})


def test_health_and_other_clients_answer_during_slow_inference(server):
    server.policy.delay = 1.0
    try:
        results = {}

        def slow():
            with RemotePolicy(server.url, TOKEN) as r:
                results["slow"] = r.predict_action(obs())

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.2)  # the slow request is in the model now
        h = healthz(server.url)
        with RemotePolicy(server.url, TOKEN) as other:
            other.ping()
        assert h["inflight"] == 1 and "slow" not in results  # both answered while the model was still busy
        t.join(5)
        assert results["slow"].shape == (1, 8, 3)
    finally:
        server.policy.delay = 0.0


def test_several_clients_at_once(server):
    errors, shapes = [], []

    def client(i):
        try:
            with RemotePolicy(server.url, TOKEN) as r:
                shapes.extend(r.predict_action(obs(i + 1)).shape for _ in range(3))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    assert not errors and sorted(s[0] for s in shapes) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_short_token_is_refused_at_start():
    with pytest.raises(ValueError, match="at least 16"):
        PolicyServer(tiny_dit(), "short")


def test_a_timeout_takes_about_the_configured_time(server):
    """A server that stops answering (frozen relay: the connection stays open) costs `timeout`, not 3x it."""
    proxy = FreezableProxy(server.port)
    try:
        remote = RemotePolicy(proxy.url, TOKEN, timeout=0.5)
        assert remote.predict_action(obs()).shape == (1, 8, 3)
        proxy.frozen.set()
        t0 = time.monotonic()
        with pytest.raises(RemotePolicyError, match="no reply .* within 0.5 s"):
            remote.predict_action(obs())
        assert time.monotonic() - t0 < 0.9
        proxy.frozen.clear()
        assert remote.predict_action(obs()).shape == (1, 8, 3)  # reconnects on the next call
        remote.close()
    finally:
        proxy.close()


def test_close_ends_a_request_in_flight(server):
    """An e-stop closes the policy while an async inference waits on a hung server: the request ends at once."""
    proxy = FreezableProxy(server.port)
    try:
        remote = RemotePolicy(proxy.url, TOKEN, timeout=5)
        remote.ping()
        proxy.frozen.set()
        errors = []

        def request():
            try:
                remote.predict_action(obs())
            except RemotePolicyError as exc:
                errors.append(exc)

        worker = threading.Thread(target=request)
        worker.start()
        time.sleep(0.2)  # the request is out, no reply comes
        t0 = time.monotonic()
        remote.close()
        worker.join(5)
        assert time.monotonic() - t0 < 1.0 and not worker.is_alive() and errors
    finally:
        proxy.close()


def test_non_finite_actions_are_an_error_reply():
    policy = ConstantPolicy([0.0, np.nan, 0.0, np.inf])
    policy.obs_shapes = {"state": ((5,), "float32")}
    with PolicyServer(policy, TOKEN) as srv, RemotePolicy(srv.url, TOKEN) as remote:
        with pytest.raises(RemotePolicyError, match="nonfinite_action.*16 non-finite"):
            remote.predict_action(obs())
        assert srv.stats["served"] == 0 and srv.stats["errors"] == 1


def test_goals_by_task_name_and_instruction_travel_as_text():
    """A deployment names the task (or speaks the instruction) instead of looking up ids: text goals used to be
    refused by the wire ('must be a map {key: array}')."""
    policy = tiny_dit(num_tasks=2)
    policy.task_names = ["reach-v3", "push-v3"]  # as load_policy records them
    with PolicyServer(policy, TOKEN, host="127.0.0.1", port=0) as srv, RemotePolicy(srv.url, TOKEN) as remote:
        by_name = remote.predict_action(obs(2), goal={"task": ["push-v3", "reach-v3"]},
                                        generator=torch.Generator().manual_seed(1))
        by_id = remote.predict_action(obs(2), goal={"task_id": np.array([1, 0])},
                                      generator=torch.Generator().manual_seed(1))
        assert torch.equal(by_name, by_id)
        with pytest.raises(RemotePolicyError, match=r"goal task \['pick-v3'\] is not one this policy was trained"):
            remote.predict_action(obs(1), goal={"task": "pick-v3"})
        with pytest.raises(RemotePolicyError, match="trained with a language encoder"):
            remote.predict_action(obs(1), goal={"task_id": np.array([0]), "instruction": "reach the goal"})
        with pytest.raises(RemotePolicyError, match="goal 'lang_emb' must be an array"):
            remote.predict_action(obs(1), goal={"lang_emb": "not numbers"})
        # the client knows what the served policy reads (evaluation gives task ids only to policies that read them)
        assert remote.goal_keys() == policy.goal_keys() == ["task", "task_id"] and remote.takes_task
        with pytest.raises(RemotePolicyError, match=r"goal \['colour'\]: DiTPolicy takes \['task', 'task_id'\]"):
            remote.predict_action(obs(1), goal={"colour": np.zeros(1)})


def test_evaluation_reads_the_checkpoint_and_task_goals_from_the_server():
    """What evaluation needs of a checkpoint (store record, task count, sampler) comes with the meta, and a task's
    goal is the served policy's own `goal_for_task` (e.g. an instruction embedding computed where the encoder is)."""
    policy = tiny_dit(num_tasks=2)
    policy.checkpoint_dir, policy.task_names = "/runs/x/step_1", ["reach-v3", "push-v3"]
    policy.checkpoint_config = {"store": {"env": {"name": "metaworld/reach-v3", "tasks": ["reach-v3", "push-v3"]}}}

    def goal_for_task(task, instruction=None, goal_image=None):
        if task not in policy.task_names:
            raise ValueError(f"unknown task {task!r}")
        return {"lang_emb": torch.full((4,), float(len(instruction or "")))}

    policy.goal_for_task = goal_for_task
    with PolicyServer(policy, TOKEN) as srv, RemotePolicy(srv.url, TOKEN) as remote:
        assert remote.checkpoint_config["store"]["env"]["tasks"] == ["reach-v3", "push-v3"]
        assert remote.num_tasks == 2 and remote.task_names == ["reach-v3", "push-v3"]
        assert remote.meta["checkpoint"] == "/runs/x/step_1" and remote.num_inference_steps == 2
        goal = remote.goal_for_task("push-v3", instruction="push it")
        assert list(goal) == ["lang_emb"] and np.array_equal(goal["lang_emb"], np.full(4, 7.0, np.float32))
        with pytest.raises(RemotePolicyError, match="policy_error.*unknown task 'pick-v3'"):
            remote.goal_for_task("pick-v3")
        with pytest.raises(RemotePolicyError, match="goal images cannot be sent"):
            remote.goal_for_task("push-v3", goal_image="goal.png")
