"""Unit tests of the pure core: frame parsing, reply builders, version/data rules, tokens.

No sockets: every rule of PROTOCOL.md 2-3 (as DESIGN.md 2 decides) that
protocol.py, updates.py and tokens.py own is checked as a plain function,
plus hypothesis properties that parsing and token decoding never raise.
"""

from __future__ import annotations

import base64
import json
import string
import sys
import uuid

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from simplepush import protocol
from simplepush.protocol import (
    PING,
    Ack,
    Drop,
    Hello,
    Ignored,
    Ping,
    Register,
    Reject,
    Unregister,
    Wakeup,
    parse,
    uuid_key,
)
from simplepush.tokens import TokenCodec, generate_key, is_valid_key
from simplepush.updates import (
    MAX_DATA_BYTES,
    MAX_VERSION,
    DataTooLong,
    InvalidVersion,
    Update,
    check_data,
    parse_version,
)

OUTCOMES = (Ping, Ignored, Hello, Register, Unregister, Ack, Reject, Drop)
# Written out rather than imported: the test is the oracle for the wire texts (DESIGN.md 2.3).
TEXTS = {401: "Invalid Command", 413: "Too Many Channels", 503: "Service Unavailable"}
HEX = "5c6e1d2a9f834b7ea1c23d4e5f607182"
DASHED = "5c6e1d2a-9f83-4b7e-a1c2-3d4e5f607182"
NOW = 1_700_000_000


def strict_loads(text: str):
    """json.loads that refuses what RFC 8259 does not allow (NaN, Infinity)."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def nested(depth: int) -> str:
    return '{"messageType":"bogus","x":' + "[" * depth + "]" * depth + "}"


def frame(**fields) -> str:
    return json.dumps(fields)


def echoed(obj: dict, status: int) -> dict:
    """What an error reply must be: the object, messageType lowercased, plus status and error."""
    expected = dict(obj)
    if isinstance(obj.get("messageType"), str):
        expected["messageType"] = obj["messageType"].lower()
    expected.update(status=status, error=TEXTS[status])
    return expected


def assert_reject(outcome, obj: dict, status: int, close: bool) -> None:
    assert type(outcome) is Reject
    assert outcome.close is close
    assert json.loads(outcome.reply) == echoed(obj, status)


# --- hypothesis strategies -------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
uuid_spellings = st.uuids().flatmap(
    lambda u: st.sampled_from([u.hex, str(u), u.hex.upper(), str(u).upper()])
)
ids = uuid_spellings | st.text(max_size=40) | json_values
message_types = (
    st.sampled_from(
        [
            *("hello", "HELLO", "register", "Register", "unregister", "ack", "acK"),
            *("ping", "PING", "purge", "nack", "", "bogus"),
        ]
    )
    | json_values
)
digits = st.text(string.digits, min_size=1, max_size=3)
# Frames shaped like real commands, so that parsing gets past the first checks.
command_frames = st.tuples(
    st.fixed_dictionaries(
        {"messageType": message_types},
        optional={
            "uaid": ids,
            "channelIDs": st.lists(ids, max_size=4) | json_values,
            "channelID": ids,
            "updates": st.lists(
                st.fixed_dictionaries({"channelID": ids, "version": st.integers() | json_values}),
                max_size=3,
            )
            | json_values,
            "wakeup_hostport": st.fixed_dictionaries(
                {"ip": st.sampled_from(["10.0.0.1", "::1", "nope"]) | json_values},
                optional={"port": st.integers(-1, 70000) | json_values},
            )
            | json_values,
            "mobilenetwork": st.fixed_dictionaries(
                {"mcc": digits | json_values, "mnc": digits | json_values},
                optional={"netid": st.text() | json_values},
            )
            | json_values,
        },
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
).map(lambda parts: {**parts[1], **parts[0]})


def check_outcome(obj: object, identified: bool, outcome: object) -> None:
    """The invariants every parse result keeps, whatever the input."""
    assert isinstance(outcome, OUTCOMES)
    if type(obj) is not dict:
        assert type(outcome) is Drop
        return
    if not obj:
        assert outcome is PING
        return
    mtype = obj.get("messageType")
    kind = mtype.lower() if isinstance(mtype, str) else None
    if type(outcome) is Reject:
        reply = strict_loads(outcome.reply)
        status = reply["status"]
        assert status in (401, 503)
        assert reply == echoed(obj, status)
        assert status == 401 or kind == "hello"
        # Only register/unregister field errors on an identified socket keep it open.
        assert outcome.close is not (identified and kind in ("register", "unregister"))
    elif type(outcome) is Hello:
        assert kind == "hello"
        assert outcome.raw == obj
        assert outcome.webpush == (obj.get("use_webpush") is True)
        uaid = obj.get("uaid") or ""
        if outcome.webpush and uaid and uuid_key(uaid) is None:
            uaid = ""  # Firefox cannot be told to retry: it gets a new UAID
        assert outcome.uaid == uaid
        assert outcome.key == (uuid_key(outcome.uaid) if outcome.uaid else "")
        # Only a WebPush hello may leave channelIDs out (Firefox does): it has none.
        assert "channelIDs" in obj or outcome.webpush
        assert outcome.channel_count == len(obj.get("channelIDs", []))
    elif type(outcome) is Register:
        assert identified and kind == "register"
        assert outcome.channel_id == obj["channelID"]
        assert outcome.key == uuid_key(obj["channelID"])
    elif type(outcome) is Unregister:
        assert identified and kind == "unregister"
        assert outcome.channel_id == obj["channelID"]
    elif type(outcome) is Ack:
        assert identified and kind == "ack"
        assert all(len(key) == 32 and 0 <= version <= MAX_VERSION for key, version in outcome.acks)
    elif type(outcome) is Ignored:
        assert kind in ("purge", "nack")
    else:
        assert kind == "ping"


@given(st.text(), st.booleans())
def test_parse_never_raises_on_any_text(text, identified):
    outcome = parse(text, identified)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        assert type(outcome) is Drop
        return
    check_outcome(obj, identified, outcome)


@given(json_values, st.booleans())
def test_parse_never_raises_on_any_json_value(value, identified):
    check_outcome(value, identified, parse(json.dumps(value), identified))


@given(command_frames, st.booleans())
def test_parse_of_command_shaped_frames_keeps_its_invariants(obj, identified):
    check_outcome(obj, identified, parse(json.dumps(obj), identified))


# --- frames that are not SimplePush ---------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "{", "hello", "{'messageType': 'hello'}", '{"messageType": }', "[" * 100_000],
)
def test_invalid_json_is_dropped(text):
    assert type(parse(text, False)) is Drop


@pytest.mark.parametrize("text", ["[]", '"hello"', "1", "null", "true", '[{"messageType":"ping"}]'])
def test_non_object_json_is_dropped(text):
    """PROTOCOL.md 2.3: a JSON value that is not an object is closed without reply."""
    assert type(parse(text, True)) is Drop


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants_are_invalid_json(constant):
    """RFC 8259 has no NaN or Infinity: such a frame is unparseable (PROTOCOL.md 2.3).

    Python's json accepts them, and an echo would then put them on the wire,
    where a strict parser (JSON.parse in Gecko) fails.
    """
    assert type(parse(f'{{"messageType":"bogus","x":{constant}}}', False)) is Drop


def test_overflowing_number_is_never_echoed_as_infinity():
    outcome = parse('{"messageType":"bogus","x":1e400}', False)
    assert type(outcome) in (Drop, Reject)
    if type(outcome) is Reject:
        strict_loads(outcome.reply)


def test_parse_never_raises_at_any_nesting_depth():
    """Decoding and the echo's encoding reach the recursion limit at different depths.

    A frame nested just deep enough to decode but not to encode must still
    become a Reject or a Drop, not an exception.
    """
    for depth in range(1, sys.getrecursionlimit() + 50):
        try:
            outcome = parse(nested(depth), False)
        except RecursionError:
            pytest.fail(f"parse raised RecursionError at nesting depth {depth}")
        assert type(outcome) in (Reject, Drop)


# --- pings, purge, nack ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "{ }",
        " {}\n",
        '{"messageType":"ping"}',
        '{"messageType":"PING"}',
        '{"messageType":"Ping","channelIDs":[],"uaid":"x","nada":""}',
    ],
)
@pytest.mark.parametrize("identified", [False, True])
def test_pings_in_every_form_before_and_after_hello(text, identified):  # 7.7 item 2
    assert parse(text, identified) is PING


def test_ping_reply_is_exactly_an_empty_object():  # 7.7 item 2
    assert protocol.PING_REPLY == "{}"


@pytest.mark.parametrize("mtype", ["purge", "PURGE", "nack"])
@pytest.mark.parametrize("identified", [False, True])
def test_purge_and_nack_are_accepted_without_reply(mtype, identified):  # 7.7 item 12
    assert parse(frame(messageType=mtype, version=3), identified) == Ignored(mtype.lower())


# --- messageType dispatch --------------------------------------------------


@pytest.mark.parametrize("mtype", ["", " ", "bogus", "hell", "UNKNOWN", 123, None, [], {}, True])
@pytest.mark.parametrize("identified", [False, True])
def test_unknown_blank_or_non_string_message_type_is_refused(mtype, identified):  # 7.7 item 5
    obj = {"messageType": mtype, "uaid": HEX, "channelIDs": []}
    assert_reject(parse(json.dumps(obj), identified), obj, 401, close=True)


@pytest.mark.parametrize("key", ["messagetype", "MessageType", " messageType ", "type"])
def test_message_type_key_is_matched_exactly(key):
    """DESIGN.md 2.2 overrides PROTOCOL.md 7.7 item 4: keys are case-sensitive, never trimmed."""
    obj = {key: "hello", "uaid": "", "channelIDs": []}
    assert_reject(parse(json.dumps(obj), False), obj, 401, close=True)


def test_message_type_value_is_case_insensitive():  # 7.7 item 3
    hello = parse(frame(messageType="HeLLo", uaid="", channelIDs=[]), False)
    assert type(hello) is Hello
    assert type(parse(frame(messageType="REGISTER", channelID=HEX), True)) is Register
    assert type(parse(frame(messageType="UnRegister", channelID=HEX), True)) is Unregister
    assert type(parse(frame(messageType="ACK", updates=[]), True)) is Ack


@pytest.mark.parametrize(
    "obj",
    [
        {"messageType": "register", "channelID": DASHED},
        {"messageType": "Unregister", "channelID": DASHED},
        {"messageType": "acK", "updates": [{"channelID": DASHED, "version": 23}]},
    ],
)
def test_commands_before_hello_are_refused_with_an_echo(obj):  # 7.7 item 5
    assert_reject(parse(json.dumps(obj), False), obj, 401, close=True)


# --- hello -----------------------------------------------------------------


@pytest.mark.parametrize("fields", [{}, {"uaid": ""}, {"uaid": None}])
def test_hello_without_uaid(fields):
    outcome = parse(frame(messageType="hello", channelIDs=[HEX], **fields), False)
    assert outcome == Hello(
        {"messageType": "hello", "channelIDs": [HEX], **fields}, "", "", 1, None
    )


@pytest.mark.parametrize("uaid", [HEX, HEX.upper(), DASHED, DASHED.upper(), "5C6e1D2a" + HEX[8:]])
def test_hello_keeps_uaid_spelling_and_canonicalises_its_key(uaid):  # 7.7 item 6
    outcome = parse(frame(messageType="hello", uaid=uaid, channelIDs=[]), False)
    assert (outcome.uaid, outcome.key, outcome.channel_count) == (uaid, HEX, 0)


MALFORMED_UAIDS = [
    "valid_uaid",
    " fooey barrey ",
    "!@#$%^&*()-+=[]{};:'<>,.?/",
    "0",
    "1",
    "-66000",
    "True",
    "False",
    "true",
    "false",
    '"foo bar"',
    "5c6e1d2a-9f83-4b7e-a1c2-3d4e5f60718",
    "5c6e1d2a9-f83-4b7e-a1c2-3d4e5f607182",
    HEX[:-1],
    HEX + "0",
    HEX[:-1] + "g",
    HEX + "\n",
    "f" * 128_000,
]


@pytest.mark.parametrize("uaid", MALFORMED_UAIDS, ids=lambda u: u[:40])
def test_hello_with_malformed_uaid_is_503(uaid):  # 7.7 item 6
    obj = {"messageType": "hello", "uaid": uaid, "channelIDs": [], "customKey": "custom"}
    assert_reject(parse(json.dumps(obj), False), obj, 503, close=True)


@pytest.mark.parametrize("uaid", [0, 123, 1.5, True, False, [], [HEX], {}])
def test_hello_with_non_string_uaid_is_401(uaid):
    obj = {"messageType": "hello", "uaid": uaid, "channelIDs": []}
    assert_reject(parse(json.dumps(obj), False), obj, 401, close=True)


@pytest.mark.parametrize(
    "obj",
    [
        {"messageType": "hello", "uaid": HEX},
        {"messageType": "hello", "uaid": HEX, "channelIDs": None},
        {"messageType": "hello", "uaid": HEX, "channelIDs": HEX},
        {"messageType": "hello", "uaid": HEX, "channelIDs": {}},
        {"messageType": "hello", "uaid": HEX, "channelIDs": [HEX, 7]},
        {"messageType": "hello", "uaid": HEX, "ChannelIds": [HEX]},
        # channelIDs are checked first: a malformed uaid without them is still a 401
        {"messageType": "hello", "uaid": "valid_uaid"},
    ],
)
def test_hello_needs_a_list_of_string_channel_ids(obj):  # 7.7 item 6
    assert_reject(parse(json.dumps(obj), False), obj, 401, close=True)


def test_second_hello_is_parsed_for_the_session_to_judge():
    """An identified socket may say hello again (PROTOCOL.md 3.2.5); the session decides."""
    assert type(parse(frame(messageType="hello", uaid="", channelIDs=[]), True)) is Hello


def test_hello_counts_channel_ids_without_judging_them():
    outcome = parse(frame(messageType="hello", uaid=HEX, channelIDs=["1", "2", ""]), False)
    assert outcome.channel_count == 3


# --- UDP wake-up fields ----------------------------------------------------


def wakeup_of(**fields) -> Wakeup | None:
    outcome = parse(frame(messageType="hello", uaid="", channelIDs=[], **fields), False)
    assert type(outcome) is Hello, "bad wake-up fields are ignored, never refused"
    return outcome.wakeup


def test_wakeup_fields_are_kept():
    assert wakeup_of(
        wakeup_hostport={"ip": "10.71.22.5", "port": 50213},
        mobilenetwork={"mcc": "214", "mnc": "07", "netid": "10.1.2.3"},
    ) == Wakeup("10.71.22.5", 50213, "214", "07", "10.1.2.3")


def test_wakeup_port_and_network_are_optional():
    assert wakeup_of(wakeup_hostport={"ip": "::1"}) == Wakeup("::1", None, None, None, None)


@pytest.mark.parametrize(
    "fields",
    [
        {"wakeup_hostport": "10.0.0.1:5000"},
        {"wakeup_hostport": {"port": 5000}},
        {"wakeup_hostport": {"ip": "10.0.0", "port": 5000}},
        {"wakeup_hostport": {"ip": "example.net", "port": 5000}},
        {"wakeup_hostport": {"ip": "10.0.0.1", "port": 0}},
        {"wakeup_hostport": {"ip": "10.0.0.1", "port": 65535}},
        {"wakeup_hostport": {"ip": "10.0.0.1", "port": "5000"}},
        {"wakeup_hostport": {"ip": "10.0.0.1", "port": True}},
        {"wakeup_hostport": {"ip": "10.0.0.1"}, "mobilenetwork": {"mcc": "21a", "mnc": "07"}},
        {"wakeup_hostport": {"ip": "10.0.0.1"}, "mobilenetwork": {"mcc": "214"}},
        {"wakeup_hostport": {"ip": "10.0.0.1"}, "mobilenetwork": {"mcc": "٢١٤", "mnc": "07"}},
        {"wakeup_hostport": {"ip": "10.0.0.1"}, "mobilenetwork": {"mcc": 214, "mnc": "07"}},
        {
            "wakeup_hostport": {"ip": "10.0.0.1"},
            "mobilenetwork": {"mcc": "214", "mnc": "07", "netid": 3},
        },
    ],
)
def test_unusable_wakeup_fields_are_ignored(fields):
    """PROTOCOL.md 3.2.6 step 1 and 5: validate, and ignore what does not validate."""
    assert wakeup_of(**fields) is None


# --- register and unregister ----------------------------------------------


@pytest.mark.parametrize("chid", [HEX, HEX.upper(), DASHED, DASHED.upper(), "5C6E1d2a" + HEX[8:]])
def test_register_accepts_both_uuid_spellings_in_any_case(chid):  # 7.7 item 8
    obj = {"messageType": "register", "channelID": chid, "uaid": ""}
    assert parse(json.dumps(obj), True) == Register(obj, chid, HEX)


@pytest.mark.parametrize(
    "obj",
    [
        {"messageType": "register"},
        {"messageType": "register", "channelID": ""},
        {"messageType": "register", "channelID": HEX + "ab"},
        {"messageType": "register", "channelID": HEX[:-1]},
        {"messageType": "register", "channelID": "not-a-uuid"},
        {"messageType": "register", "channelID": " " + DASHED},
        {"messageType": "register", "channelID": 123},
        {"messageType": "register", "channelID": None},
        {"messageType": "register", "channelID": [HEX]},
        {"messageType": "registeR", "channelIDs": [HEX], "uaiD": HEX},
    ],
)
def test_register_with_a_bad_channel_id_is_401_and_keeps_the_socket(obj):  # 7.7 item 8
    assert_reject(parse(json.dumps(obj), True), obj, 401, close=False)


@pytest.mark.parametrize(
    ("chid", "key"), [(DASHED, HEX), (HEX.upper(), HEX), ("not-a-uuid", None), ("1", None)]
)
def test_unregister_accepts_any_channel_id_string(chid, key):  # 7.7 item 9
    obj = {"messageType": "unregister", "channelID": chid}
    assert parse(json.dumps(obj), True) == Unregister(obj, chid, key)


@pytest.mark.parametrize("fields", [{}, {"channelID": ""}, {"channelID": 7}, {"channelID": None}])
def test_unregister_without_a_channel_id_is_401_and_keeps_the_socket(fields):
    obj = {"messageType": "unregister", **fields}
    assert_reject(parse(json.dumps(obj), True), obj, 401, close=False)


# --- ack -------------------------------------------------------------------


def test_ack_keeps_the_well_formed_entries_as_canonical_keys():
    other = uuid.uuid4()
    updates = [
        {"channelID": DASHED, "version": 3},
        {"channelID": other.hex.upper(), "version": 0},
        {"channelID": "not-a-uuid", "version": 1},
        {"channelID": HEX, "version": -1},
        {"channelID": HEX, "version": MAX_VERSION + 1},
        {"channelID": HEX, "version": 1.0},
        {"channelID": HEX, "version": "4"},
        {"channelID": HEX, "version": True},
        {"channelID": 5, "version": 4},
        {"version": 4},
        "junk",
        None,
        {"channelID": HEX, "version": MAX_VERSION},
    ]
    outcome = parse(frame(messageType="ack", updates=updates), True)
    assert outcome == Ack(((HEX, 3), (other.hex, 0), (HEX, MAX_VERSION)))


@pytest.mark.parametrize("fields", [{}, {"updates": []}, {"updates": None}, {"updates": "x"}])
def test_ack_without_updates_is_tolerated(fields):
    """PROTOCOL.md 8 #19: an empty or missing list is ignored, not an error."""
    assert parse(frame(messageType="ack", **fields), True) == Ack(())


# --- uuid_key --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (HEX, HEX),
        (HEX.upper(), HEX),
        (DASHED, HEX),
        (DASHED.upper(), HEX),
        (HEX + "\n", None),
        (DASHED.replace("-", "_"), None),
        (HEX[:8] + "-" + HEX[8:], None),
        ("", None),
        ("\uff10" * 32, None),  # fullwidth zeros,
    ],
)
def test_uuid_key(value, key):
    assert uuid_key(value) == key


# --- reply builders --------------------------------------------------------


def test_hello_reply():
    assert json.loads(protocol.hello_reply(DASHED)) == {
        "messageType": "hello",
        "uaid": DASHED,
        "status": 200,
    }


def test_register_reply():
    reply = protocol.register_reply(DASHED.upper(), HEX, "http://h/update/t")
    assert json.loads(reply) == {
        "messageType": "register",
        "channelID": DASHED.upper(),
        "status": 200,
        "uaid": HEX,
        "pushEndpoint": "http://h/update/t",
    }


def test_unregister_reply():
    assert json.loads(protocol.unregister_reply("x")) == {
        "messageType": "unregister",
        "channelID": "x",
        "status": 200,
    }


def test_notification_carries_data_only_when_sent():  # 7.7 item 11
    frame_text = protocol.notification(
        [Update(DASHED, 12), Update(HEX, 0, "hi"), Update("c", 1, "")]
    )
    assert json.loads(frame_text) == {
        "messageType": "notification",
        "updates": [
            {"channelID": DASHED, "version": 12},
            {"channelID": HEX, "version": 0, "data": "hi"},
            {"channelID": "c", "version": 1, "data": ""},
        ],
    }


def test_error_reply_overrides_status_and_keeps_odd_message_types():  # 7.7 item 5
    obj = {"messageType": 7, "status": 200, "error": "none", "x": [1]}
    assert json.loads(protocol.error_reply(obj, 401)) == {
        "messageType": 7,
        "status": 401,
        "error": "Invalid Command",
        "x": [1],
    }
    assert json.loads(protocol.error_reply({"messageType": "HELLO"}, 503)) == {
        "messageType": "hello",
        "status": 503,
        "error": "Service Unavailable",
    }
    assert json.loads(protocol.error_reply({}, 413)) == {
        "status": 413,
        "error": "Too Many Channels",
    }


# --- versions (DESIGN.md 2.5, PROTOCOL.md 4.4) -----------------------------


@pytest.mark.parametrize("text", [None, ""])
def test_missing_or_empty_version_is_now(text):  # 7.7 item 10
    assert parse_version(text, NOW) == NOW


@pytest.mark.parametrize(
    ("text", "version"), [("0", 0), ("12", 12), ("007", 7), (str(MAX_VERSION), MAX_VERSION)]
)
def test_versions_are_taken_literally(text, version):  # 7.7 item 10
    assert parse_version(text, NOW) == version


@pytest.mark.parametrize(
    "text",
    [
        *("-5", "-0", "abc", "1.5", "1e3", " 12", "12 ", "+12", "1_000", "0x10"),
        *("\u0661\u0662", "\uff11\uff12", str(MAX_VERSION + 1), "9" * 100),
    ],
)
def test_bad_versions_are_invalid(text):
    with pytest.raises(InvalidVersion):
        parse_version(text, NOW)


@given(st.integers(0, MAX_VERSION))
def test_every_version_in_range_round_trips(version):
    assert parse_version(str(version), NOW) == version


@given(st.integers(max_value=-1) | st.integers(min_value=MAX_VERSION + 1))
def test_every_version_out_of_range_is_invalid(version):
    with pytest.raises(InvalidVersion):
        parse_version(str(version), NOW)


@given(st.text())
def test_parse_version_accepts_only_ascii_digits(text):
    try:
        version = parse_version(text, NOW)
    except InvalidVersion:
        assert not (text.isascii() and text.isdigit() and int(text) <= MAX_VERSION)
        return
    if text:
        assert text.isascii() and text.isdigit() and version == int(text)
    else:
        assert version == NOW


# --- data (DESIGN.md 2.9) --------------------------------------------------


@pytest.mark.parametrize("data", [None, ""])
def test_empty_data_is_no_data(data):
    assert check_data(data) is None


@pytest.mark.parametrize(
    ("char", "fits"),
    [("a", 4096), ("é", 2048), ("€", 1365), ("😀", 1024)],
)
def test_data_limit_is_4096_utf8_bytes(char, fits):
    assert check_data(char * fits) == char * fits
    with pytest.raises(DataTooLong):
        check_data(char * (fits + 1))


@given(st.sampled_from("aé€😀"), st.integers(1, 4200))
def test_data_is_refused_exactly_when_over_4096_bytes(char, count):
    data = char * count
    if len(data.encode("utf-8")) > MAX_DATA_BYTES:
        with pytest.raises(DataTooLong):
            check_data(data)
    else:
        assert check_data(data) == data


@given(st.text(st.characters(exclude_categories=("Cs",)), min_size=1))
def test_short_data_passes_unchanged(data):
    assert check_data(data) == data


# --- tokens ----------------------------------------------------------------

KEY, OTHER_KEY = generate_key(), generate_key()
CODEC = TokenCodec([KEY])
hex_ids = st.uuids().map(lambda u: u.hex)


def padded(token: str) -> bytes:
    return token.encode() + b"=" * (-len(token) % 4)


@given(hex_ids, hex_ids)
def test_token_round_trip(uaid, chid):
    token = CODEC.encode(uaid, chid)
    assert set(token) <= set(string.ascii_letters + string.digits + "-_")
    assert CODEC.decode(token) == (uaid, chid)


def test_tokens_differ_per_register_and_all_decode():
    """Fernet's random IV: every register yields a new URL, all valid (PROTOCOL.md 3.3)."""
    first, second = CODEC.encode(HEX, HEX), CODEC.encode(HEX, HEX)
    assert first != second
    assert CODEC.decode(first) == CODEC.decode(second) == (HEX, HEX)


@given(st.data())
def test_tampered_token_is_refused(data):
    token = CODEC.encode(HEX, uuid.uuid4().hex)
    position = data.draw(st.integers(0, len(token) - 1))
    alphabet = string.ascii_letters + string.digits + "-_"
    char = data.draw(st.sampled_from(alphabet.replace(token[position], "")))
    assert CODEC.decode(token[:position] + char + token[position + 1 :]) is None


@pytest.mark.parametrize("keep", [0, 1, 10, 100, -4, -3, -2, -1])
def test_truncated_token_is_refused(keep):
    token = CODEC.encode(HEX, HEX)
    assert CODEC.decode(token[:keep]) is None


def test_extended_token_is_refused():
    token = CODEC.encode(HEX, HEX)
    assert CODEC.decode(token + "A") is None
    assert CODEC.decode(token + "AAAA") is None


def test_token_from_a_foreign_key_is_refused():
    assert CODEC.decode(TokenCodec([OTHER_KEY]).encode(HEX, HEX)) is None


@pytest.mark.parametrize("suffix", ["=", "==", "==="])
def test_padded_token_is_refused(suffix):
    """Only the unpadded form is ours: a re-encoded token is a different URL."""
    assert CODEC.decode(CODEC.encode(HEX, HEX) + suffix) is None


def test_standard_base64_token_is_refused():
    token = next(t for t in (CODEC.encode(HEX, HEX) for _ in range(100)) if set(t) & set("-_"))
    standard = base64.b64encode(base64.urlsafe_b64decode(padded(token))).decode()
    assert set(standard) & set("+/")
    assert CODEC.decode(standard) is None
    assert CODEC.decode(standard.rstrip("=")) is None


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_token_that_does_not_hold_two_ids_is_refused(size):
    token = Fernet(KEY).encrypt(b"\x01" * size).rstrip(b"=").decode()
    assert CODEC.decode(token) is None


@pytest.mark.parametrize("token", ["", "A" * 513, "é" * 140, "a b", "a/b", "a.b", "%41"])
def test_tokens_outside_our_alphabet_or_length_are_refused(token):
    assert CODEC.decode(token) is None


@given(st.text())
def test_token_decode_never_raises(text):
    assert CODEC.decode(text) is None


def test_key_rotation():
    """New key first encrypts; the old key, listed second, still decrypts; removed, it does not."""
    old_token = CODEC.encode(HEX, DASHED.replace("-", ""))
    rotated = TokenCodec([OTHER_KEY, KEY])
    assert rotated.decode(old_token) == (HEX, DASHED.replace("-", ""))
    new_token = rotated.encode(HEX, HEX)
    assert TokenCodec([OTHER_KEY]).decode(new_token) == (HEX, HEX)
    assert CODEC.decode(new_token) is None
    assert TokenCodec([OTHER_KEY]).decode(old_token) is None


def test_generated_keys_are_valid_and_distinct():
    assert is_valid_key(KEY) and is_valid_key(OTHER_KEY)
    assert KEY != OTHER_KEY


@pytest.mark.parametrize(
    "key",
    [
        *("", "abc", "é" * 44, "!" * 44),
        *(base64.urlsafe_b64encode(b"k" * size).decode() for size in (31, 33)),
    ],
)
def test_invalid_keys(key):
    assert not is_valid_key(key)


def test_token_cache_answers_repeats_and_stays_bounded():
    """Cached decodes give the same ids; the cache never grows past its size."""
    codec = TokenCodec([generate_key()], cache_size=3)
    tokens = [codec.encode(uuid.uuid4().hex, uuid.uuid4().hex) for _ in range(5)]
    first = [codec.decode(token) for token in tokens]
    assert [codec.decode(token) for token in tokens] == first
    assert len(codec._cache) == 3
    assert codec.decode(tokens[0][:-1] + ("A" if tokens[0][-1] != "A" else "B")) is None
    assert len(codec._cache) == 3
