"""Which adapter a request's model name resolves to while a canary runs (generation.resolve_model).

The engine here is a stand-in holding only names (pure logic: no vLLM); the live routing across replicas is
tests/e2e/test_canary.py."""

from __future__ import annotations

import pytest

from services.adapters.canary import canary_bucket
from services.api.errors import ApiError
from services.api.generation import resolve_model
from services.engine.engine import Adapter, Resolved, UnknownModel

ACTIVE, CANARY = "feedloop-v1", "feedloop-v2"


class Names:
    """What resolve_model needs from the engine: public names to adapters."""

    def __init__(self) -> None:
        self.adapters = {v: Adapter(v, f"/a/{v}", i) for i, v in enumerate((ACTIVE, CANARY), 1)}

    def resolve(self, name: str) -> Resolved:
        if name == "feedloop":
            return Resolved(name, self.adapters[ACTIVE])
        if name in self.adapters:
            return Resolved(name, self.adapters[name])
        raise UnknownModel(name)


USERS = [f"shop:user-{i}" for i in range(400)]


def test_alias_requests_of_the_canarys_users_go_to_the_canary_and_versions_are_never_rerouted() -> None:
    engine, canary = Names(), (CANARY, 0.25)
    routed = {u for u in USERS if resolve_model(engine, "feedloop", u, canary, "feedloop").canary}  # type: ignore[arg-type]
    assert routed == {u for u in USERS if canary_bucket(CANARY, u) < 0.25}
    assert 60 < len(routed) < 140
    user = next(iter(routed))
    target = resolve_model(engine, "feedloop", user, canary, "feedloop")  # type: ignore[arg-type]
    assert (target.public_name, target.adapter_name, target.canary) == ("feedloop", CANARY, True)
    explicit = resolve_model(engine, ACTIVE, user, canary, "feedloop")  # type: ignore[arg-type]
    assert (explicit.adapter_name, explicit.canary) == (ACTIVE, False)
    assert resolve_model(engine, "feedloop", user, None, "feedloop").adapter_name == ACTIVE  # type: ignore[arg-type]


def test_an_unknown_model_is_404_and_an_unloaded_canary_falls_back_to_the_alias() -> None:
    engine = Names()
    with pytest.raises(ApiError) as error:
        resolve_model(engine, "nope")  # type: ignore[arg-type]
    assert error.value.status == 404
    target = resolve_model(engine, "feedloop", "shop:u", ("feedloop-v9", 1.0), "feedloop")  # type: ignore[arg-type]
    assert (target.adapter_name, target.canary) == (ACTIVE, False)
