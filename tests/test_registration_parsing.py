"""Registration interface parsing and the registration rate limit, without sockets (issue 5 groundwork)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilotboat.lwm2m.registration import (
    DEFAULT_LIFETIME,
    MAX_OBJECT_LINKS,
    RegistrationError,
    read_objects,
    read_register,
    read_update,
)
from pilotboat.registry.hold import Admission, RegistrationHold


def test_register_query_with_defaults_and_in_any_order() -> None:
    query = read_register(["ep=dev-1"])
    assert (query.endpoint, query.lifetime, query.lwm2m_version, query.binding, query.queue_mode, query.sms) == (
        "dev-1", DEFAULT_LIFETIME, "1.0", "U", False, None,
    )
    full = read_register(["b=U", "lt=300", "aid=77", "lwm2m=1.1", "Q", "ep=dev-1", "sms=+4912345"])
    assert (full.lifetime, full.lwm2m_version, full.binding, full.queue_mode, full.sms) == (300, "1.1", "U", True, "+4912345")
    assert read_register(["ep=d", "b=UQ"]).queue_mode and read_register(["ep=d", "b=UQ"]).binding == "U"  # LwM2M 1.0
    assert read_register(['lwm2m="1.2"', "ep=d"]).lwm2m_version == "1.2"


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        ([], "4.00", "missing ep"),
        (["ep="], "4.00", "missing ep"),
        (["ep=" + "x" * 257], "4.00", "longer"),
        (["ep=d", "lt=0"], "4.00", "lt must be"),
        (["ep=d", "lt=-5"], "4.00", "lt must be"),
        (["ep=d", "lt=abc"], "4.00", "lt must be"),
        (["ep=d", "lt"], "4.00", "lt must be"),
        (["ep=d", "b=X"], "4.00", "binding"),
        (["ep=d", "b=UU"], "4.00", "binding"),
        (["ep=d", "lwm2m=2.0"], "4.12", "not supported"),
        (["ep=d", "lwm2m=0.9"], "4.12", "not supported"),
    ],
)
def test_register_refusals(options: list[str], code: str, words: str) -> None:
    with pytest.raises(RegistrationError) as refused:
        read_register(options)
    assert refused.value.code == code and words in str(refused.value)


def test_update_query_changes_only_what_is_given() -> None:
    assert read_update([]) == read_update(["aid=1"])
    assert (read_update([]).lifetime, read_update([]).binding, read_update([]).queue_mode) == (None, None, False)
    update = read_update(["lt=120", "b=UQ"])
    assert (update.lifetime, update.binding, update.queue_mode) == (120, "U", True)
    with pytest.raises(RegistrationError):
        read_update(["lt=0"])


def test_objects_read_leniently() -> None:
    anjay = read_objects(b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303>;ver=1.1,</3303/0>')
    assert anjay.links == ("/1/0", "/3/0", "/3303", "/3303/0") and anjay.content_formats == (11543,)
    leshan = read_objects(b'</lwm2m>;rt="oma.lwm2m";ct="110 112",</lwm2m/1/0>,</lwm2m/3/0>')
    assert (leshan.root_path, leshan.links, leshan.content_formats) == ("/lwm2m", ("/1/0", "/3/0"), (110, 112))
    wakaama = read_objects(b"</1/0>,</3/0>,</1/0>,</rd>,</3/0/1>")  # no root link, a repeat, odd targets
    assert wakaama.links == ("/1/0", "/3/0") and wakaama.content_formats == ()
    assert read_objects(b"").links == ()
    with pytest.raises(RegistrationError):
        read_objects(b"\xff\xfe not link-format <<")
    with pytest.raises(RegistrationError):
        read_objects(",".join(f"</{i}/0>" for i in range(MAX_OBJECT_LINKS + 1)).encode())


@given(st.lists(st.text(max_size=40), max_size=30))
def test_any_query_either_parses_or_is_refused_with_a_code(options: list[str]) -> None:
    for read in (read_register, read_update):
        try:
            read(options)
        except RegistrationError as refused:
            assert refused.code in {"4.00", "4.12"}


@given(st.binary(max_size=400))
def test_any_payload_either_reads_or_is_refused(payload: bytes) -> None:
    try:
        objects = read_objects(payload)
    except RegistrationError as refused:
        assert refused.code == "4.00"
    else:
        assert len(objects.links) <= MAX_OBJECT_LINKS


def test_more_than_ten_operations_in_ten_seconds_hold_the_endpoint_for_a_minute() -> None:
    hold = RegistrationHold()
    decisions = [hold.admit("dev", 100 + index * 0.5).admission for index in range(11)]
    assert decisions[:10] == [Admission.ADMITTED] * 10 and decisions[10] is Admission.HOLD_STARTED
    held = hold.admit("dev", 130)
    assert held.admission is Admission.HELD and held.retry_after == pytest.approx(35)
    assert hold.admit("other", 130).admission is Admission.ADMITTED  # per endpoint
    assert hold.release_due(159) == [] and hold.next_release() == pytest.approx(165)
    assert hold.release_due(165) == ["dev"] and hold.release_due(200) == []
    again = hold.admit("dev", 166)
    assert again.admission is Admission.ADMITTED and not again.released  # counting starts afresh


def test_operations_spread_out_are_never_held() -> None:
    hold = RegistrationHold()
    assert all(hold.admit("dev", index * 1.1).admission is Admission.ADMITTED for index in range(100))


def test_every_hold_is_released_exactly_once() -> None:
    hold = RegistrationHold(limit=1, window=10, hold=5)
    hold.admit("dev", 0)
    assert hold.admit("dev", 1).admission is Admission.HOLD_STARTED  # held until 6
    after = hold.admit("dev", 7)  # the first hold is over and release_due() has not reported it
    assert after.admission is Admission.ADMITTED and after.released
    assert hold.admit("dev", 8).admission is Admission.HOLD_STARTED  # held again until 13
    assert hold.release_due(20) == ["dev"]  # the second hold; the first was reported by admit()
    assert hold.release_due(30) == [] and hold.next_release() is None
