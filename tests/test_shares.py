"""signd.shares: the wrap key's secret as Shamir share lines, and back.

The known answers are worked out here with an independent GF(2^128) (the
textbook carry-less product, reduced by x^128 + x^7 + x^2 + x + 1), itself
checked against a vector the ssss tool made (pycryptodome's self-test data).
Share lines are built and checked here from the format in the module
docstring, not with the module's own helpers.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Callable

import pytest
from Crypto.Protocol import SecretSharing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.errors import InvalidArgument
from signd.shares import ShareError, check_value, combine, split

SECRET = bytes(range(32))
#: check_value(SECRET), worked out once with Python's hmac module.
SECRET_CHECK_VALUE = "77434ccb269fbf1d"

#: split(SECRET, 2, 3) with the library's random bytes from ``_fixed_rng``.
SECRET_2_OF_3 = [
    "signd-share-v1-77434ccb-2-1-1181b597-1b668d83-0ab41528-4e94d74a"
    "-96cf4027-de9f2949-de7616db-cb9fb8c4-fcf9b17d",
    "signd-share-v1-77434ccb-2-2-23006d2b-3ac2110f-0d73344d-893ebc85"
    "-1dadb67a-810168aa-94c7039a-b318532e-cee2ba05",
    "signd-share-v1-77434ccb-2-3-3280dabf-25a19a8b-0fce2b6e-cba765c0"
    "-9b73e44e-4b8b57f4-52a80f5a-649af5f5-24a92512",
]

_REDUCER = (1 << 128) | 0x87


def _gf_mul(a: int, b: int) -> int:
    """a * b in GF(2^128): bit i is the coefficient of x^i."""
    product = 0
    for bit in range(128):
        if b >> bit & 1:
            product ^= a << bit
    for bit in range(254, 127, -1):
        if product >> bit & 1:
            product ^= _REDUCER << (bit - 128)
    return product


def _gf_pow(a: int, exponent: int) -> int:
    result = 1
    for _ in range(exponent):
        result = _gf_mul(result, a)
    return result


def _evaluate(coefficients: list[int], x: int) -> int:
    """The polynomial sum(c_j x^j) at x, term by term (no Horner)."""
    y = 0
    for power, coefficient in enumerate(coefficients):
        y ^= _gf_mul(coefficient, _gf_pow(x, power))
    return y


def _int(hex_text: str) -> int:
    return int(hex_text, 16)


def _line(set_id: str, threshold: int, index: int, payload: bytes) -> str:
    hex_payload = payload.hex()
    groups = "-".join(hex_payload[i : i + 8] for i in range(0, 64, 8))
    body = f"signd-share-v1-{set_id}-{threshold}-{index}-{groups}"
    return f"{body}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"


def _fields(line: str) -> tuple[str, int, int, bytes]:
    parts = line.split("-")
    assert parts[:3] == ["signd", "share", "v1"]
    assert len(parts) == 15
    return parts[3], int(parts[4]), int(parts[5]), bytes.fromhex("".join(parts[6:14]))


def _forge(line: str, flip: int) -> str:
    """The line with payload bit ``flip`` flipped and its checksum made right again."""
    set_id, threshold, index, payload = _fields(line)
    changed = bytearray(payload)
    changed[flip // 8] ^= 1 << (flip % 8)
    return _line(set_id, threshold, index, bytes(changed))


def _fixed_rng() -> Callable[[int], bytes]:
    counter = itertools.count()

    def rng(size: int) -> bytes:
        return hashlib.sha256(b"signd test rng %d" % next(counter)).digest()[:size]

    return rng


@pytest.fixture
def fixed_rng(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], bytes]:
    """The library's random bytes made fixed (for this test only); returns a twin."""
    monkeypatch.setattr(SecretSharing, "rng", _fixed_rng())
    return _fixed_rng()


# The ssss tool's shares (hex mode, no diffusion) of two 16-byte secrets, 2 of 4.
# ssss evaluates p(x) + x^k, so share_i - i^k is a point on p.
SSSS_LOW = (
    "d9fe73909bae28b3757854c0af7ad405",
    "594ae8964294174d95c33756d2504170",
    "d897459d29da574eb40e93ec552ffe6e",
    "5823de9bf0e068b054b5f07a28056b1b",
    "db2c1f8bff46d748f795da995bd080cb",
)
SSSS_HIGH = (
    "bf4f902d9a7efafd1f3ffd9291fd5de9",
    "557bd3b0748064b533469722d1cc7935",
    "6b2717164783c66d47cd28f2119f14d0",
    "8113548ba97d58256bb4424251ae300c",
    "179e9e5a218483ddaeda57539139cf04",
)


def _ssss_points(vector: tuple[str, ...]) -> list[int]:
    """The points p(1)..p(4) of an ssss 2-of-n vector, ssss's x^2 term taken off."""
    return [_int(y) ^ _gf_pow(x, 2) for x, y in enumerate(vector[1:], 1)]


@pytest.mark.parametrize("vector", [SSSS_LOW, SSSS_HIGH])
def test_the_test_field_agrees_with_ssss(vector: tuple[str, ...]) -> None:
    secret = _int(vector[0])
    points = _ssss_points(vector)
    slope = points[0] ^ secret  # p(1) = secret + slope
    assert [_evaluate([secret, slope], x) for x in range(1, 5)] == points


def test_check_value_known_answer() -> None:
    assert check_value(SECRET) == SECRET_CHECK_VALUE
    expected = hmac.new(SECRET, b"signd wrap key check value", "sha256").hexdigest()[:16]
    assert check_value(SECRET) == expected
    assert check_value(bytes(32)) != check_value(SECRET)


def test_split_known_answer(fixed_rng: Callable[[int], bytes]) -> None:
    lines = split(SECRET, 2, 3)
    assert lines == SECRET_2_OF_3
    # Worked out here: the library draws the first half's coefficients, then
    # the second half's; the first drawn is the highest power's.
    low, high = _int(SECRET[:16].hex()), _int(SECRET[16:].hex())
    slope_low, slope_high = _int(fixed_rng(16).hex()), _int(fixed_rng(16).hex())
    expected = [
        _line(
            SECRET_CHECK_VALUE[:8],
            2,
            x,
            _evaluate([low, slope_low], x).to_bytes(16, "big")
            + _evaluate([high, slope_high], x).to_bytes(16, "big"),
        )
        for x in (1, 2, 3)
    ]
    assert lines == expected


def test_split_known_answer_three_of_five(fixed_rng: Callable[[int], bytes]) -> None:
    secret = bytes(range(100, 132))
    lines = split(secret, 3, 5)
    draws = [_int(fixed_rng(16).hex()) for _ in range(4)]
    low = [_int(secret[:16].hex()), draws[1], draws[0]]
    high = [_int(secret[16:].hex()), draws[3], draws[2]]
    set_id = check_value(secret)[:8]
    assert lines == [
        _line(
            set_id,
            3,
            x,
            _evaluate(low, x).to_bytes(16, "big") + _evaluate(high, x).to_bytes(16, "big"),
        )
        for x in range(1, 6)
    ]


def test_combine_known_answer() -> None:
    assert combine(SECRET_2_OF_3[1:]) == SECRET
    assert combine([SECRET_2_OF_3[2], SECRET_2_OF_3[0]]) == SECRET


def test_combine_ssss_vectors() -> None:
    """Lines built here from ssss's points give ssss's two secrets back, as one."""
    secret = bytes.fromhex(SSSS_LOW[0] + SSSS_HIGH[0])
    set_id = hmac.new(secret, b"signd wrap key check value", "sha256").hexdigest()[:8]
    points = zip(_ssss_points(SSSS_LOW), _ssss_points(SSSS_HIGH), strict=True)
    lines = [
        _line(set_id, 2, x, low.to_bytes(16, "big") + high.to_bytes(16, "big"))
        for x, (low, high) in enumerate(points, 1)
    ]
    for pair in itertools.permutations(lines, 2):
        assert combine(pair) == secret
    assert combine(lines) == secret


def test_every_three_of_five() -> None:
    secret = hashlib.sha256(b"every subset").digest()
    lines = split(secret, 3, 5)
    subsets = list(itertools.combinations(lines, 3))
    assert len(subsets) == 10
    for subset in subsets:
        assert combine(subset) == secret
        assert combine(subset[::-1]) == secret
    for four in itertools.combinations(lines, 4):
        assert combine(four) == secret
    assert combine(lines) == secret


@st.composite
def _splits(draw: st.DrawFn) -> tuple[bytes, int, int, list[int]]:
    secret = draw(st.binary(min_size=32, max_size=32))
    count = draw(st.integers(2, 16))
    threshold = draw(st.integers(2, count))
    chosen = draw(st.permutations(range(count)))
    size = draw(st.integers(threshold, count))
    return secret, threshold, count, chosen[:size]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_splits())
def test_any_threshold_of_shares_round_trips(case: tuple[bytes, int, int, list[int]]) -> None:
    secret, threshold, count, chosen = case
    lines = split(secret, threshold, count)
    assert len(lines) == count
    assert len(set(lines)) == count
    assert combine([lines[i] for i in chosen]) == secret
    if threshold > 2:
        with pytest.raises(ShareError, match=f"{threshold} shares are needed"):
            combine([lines[i] for i in chosen[: threshold - 1]])


def test_line_format_and_no_secret_in_it() -> None:
    secret = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
    lines = split(secret, 3, 16)
    pattern = re.compile(
        r"signd-share-v1-[0-9a-f]{8}-3-([0-9]{1,2})-(?:[0-9a-f]{8}-){8}[0-9a-f]{8}"
    )
    for number, line in enumerate(lines, 1):
        match = pattern.fullmatch(line)
        assert match is not None, line
        assert int(match[1]) == number
        assert line.split("-")[3] == check_value(secret)[:8]
        assert _line(*_fields(line)) == line
        compact = line.replace("-", "").lower()
        for secret_hex in (secret.hex(), secret[:16].hex(), secret[16:].hex()):
            assert secret_hex not in compact
        assert check_value(secret) not in compact


def test_white_space_and_case_do_not_matter() -> None:
    lines = SECRET_2_OF_3
    retyped = [" " + lines[0].upper().replace("-", " - ") + "\n", "\t" + lines[2]]
    assert combine(retyped) == SECRET


# --- refusals ------------------------------------------------------------------


def test_share_error_is_invalid_argument() -> None:
    assert issubclass(ShareError, InvalidArgument)


@pytest.mark.parametrize(
    ("secret", "threshold", "count", "message"),
    [
        (bytes(31), 2, 3, "the secret must be 32 bytes, got 31"),
        (bytes(33), 2, 3, "the secret must be 32 bytes, got 33"),
        ("00" * 32, 2, 3, "the secret must be bytes, not str"),
        (SECRET, 1, 3, r"threshold must be between 2 and count \(3\), got 1"),
        (SECRET, 4, 3, r"threshold must be between 2 and count \(3\), got 4"),
        (SECRET, 2, 1, "count must be between 2 and 16, got 1"),
        (SECRET, 2, 17, "count must be between 2 and 16, got 17"),
        (SECRET, True, 3, "threshold must be an integer, not bool"),
        (SECRET, 2, 3.0, "count must be an integer, not float"),
    ],
)
def test_split_refuses(secret: object, threshold: object, count: object, message: str) -> None:
    with pytest.raises(ShareError, match=message):
        split(secret, threshold, count)  # type: ignore[arg-type]


def test_check_value_refuses_a_short_secret() -> None:
    with pytest.raises(ShareError, match="must be 32 bytes, got 16"):
        check_value(bytes(16))


def _refusal(shares: object) -> str:
    with pytest.raises(ShareError) as caught:
        combine(shares)  # type: ignore[arg-type]
    message = caught.value.message
    assert SECRET.hex() not in message
    return message


def test_refuses_a_line_that_is_not_a_share() -> None:
    message = _refusal([SECRET_2_OF_3[0], "hello"])
    assert message.startswith("line 2 is not a signd share line")


def test_refuses_another_version() -> None:
    line = SECRET_2_OF_3[0].replace("-v1-", "-v2-")
    assert "another format version" in _refusal([line, SECRET_2_OF_3[1]])


def test_refuses_a_malformed_line() -> None:
    truncated = SECRET_2_OF_3[1][:-12] + SECRET_2_OF_3[1][-9:]
    assert _refusal([SECRET_2_OF_3[0], truncated]).startswith("line 2 is malformed")
    line = SECRET_2_OF_3[1]
    not_hex = line[:40] + "g" + line[41:]
    assert _refusal([SECRET_2_OF_3[0], not_hex]).startswith("line 2 is malformed")


def test_refuses_a_corrupted_line() -> None:
    line = SECRET_2_OF_3[2]
    digit = line[60]
    typo = line[:60] + ("0" if digit != "0" else "1") + line[61:]
    message = _refusal([SECRET_2_OF_3[0], SECRET_2_OF_3[1], typo])
    assert message == "line 3 is mistyped or corrupted: its checksum does not match"


def test_every_single_typo_is_named_before_combining() -> None:
    line = SECRET_2_OF_3[0]
    for position, char in enumerate(line):
        for typo in "0123456789abcdef-x":
            if typo == char:
                continue
            mistyped = line[:position] + typo + line[position + 1 :]
            assert _refusal([SECRET_2_OF_3[1], mistyped]).startswith("line 2 is ")


def test_refuses_shares_of_different_sets() -> None:
    other = split(bytes(32), 2, 3)
    message = _refusal([SECRET_2_OF_3[0], other[1]])
    assert message == (
        f"line 2 is a share of set {check_value(bytes(32))[:8]}, line 1 of set "
        f"{SECRET_CHECK_VALUE[:8]}: shares of different ceremonies do not mix"
    )


def test_refuses_shares_of_different_thresholds() -> None:
    three = split(SECRET, 3, 3)
    message = _refusal([SECRET_2_OF_3[0], three[1], three[2]])
    assert message == ("line 2 says 3 shares are needed, line 1 says 2: they are not of one split")


def test_refuses_a_share_given_twice() -> None:
    lines = SECRET_2_OF_3
    assert _refusal([lines[1], lines[0], lines[1]]) == "share 2 given twice (lines 1 and 3)"
    # Retyped in another case it is still the same share.
    assert _refusal([lines[2], lines[2].upper()]) == "share 3 given twice (lines 1 and 2)"


def test_refuses_two_different_shares_with_one_index() -> None:
    forged = _forge(SECRET_2_OF_3[0], 7)
    message = _refusal([SECRET_2_OF_3[0], SECRET_2_OF_3[1], forged])
    assert message == "lines 1 and 3 are both share 1 but differ: at least one of them is wrong"


def test_refuses_too_few_shares() -> None:
    lines = split(SECRET, 3, 5)
    message = _refusal([lines[4], lines[0]])
    assert message == f"3 shares are needed, 2 given: 1 more of set {SECRET_CHECK_VALUE[:8]}"
    assert _refusal([]) == "no shares given"


def test_refuses_a_forged_share_that_passed_its_checksum() -> None:
    forged = _forge(SECRET_2_OF_3[1], 100)
    message = _refusal([SECRET_2_OF_3[0], forged])
    assert message == (
        f"the shares do not combine to the secret of set {SECRET_CHECK_VALUE[:8]}: at least "
        "one of them is wrong (forged, or from another split of the same key)"
    )


def test_refuses_shares_of_two_splits_of_one_secret() -> None:
    again = split(SECRET, 2, 3)
    assert "do not combine" in _refusal([SECRET_2_OF_3[0], again[1]])


def test_refuses_a_wrong_share_beyond_the_threshold() -> None:
    lines = split(SECRET, 2, 4)
    forged = _forge(lines[3], 200)
    message = _refusal([lines[0], lines[1], lines[2], forged])
    assert message == "line 4 (share 4) does not combine with lines 1, 2: it is wrong"


@pytest.mark.parametrize(
    ("threshold", "index", "message"),
    [
        (2, 0, "its index 0 is not 1..16"),
        (2, 17, "its index 17 is not 1..16"),
        (1, 1, "its threshold 1 is not 2..16"),
        (17, 1, "its threshold 17 is not 2..16"),
    ],
)
def test_refuses_out_of_range_fields(threshold: int, index: int, message: str) -> None:
    _set_id, _m, _index, payload = _fields(SECRET_2_OF_3[0])
    line = _line(SECRET_CHECK_VALUE[:8], threshold, index, payload)
    assert _refusal([SECRET_2_OF_3[1], line]) == f"line 2 is malformed: {message}"


def test_refuses_leading_zeros() -> None:
    _set_id, _m, _index, payload = _fields(SECRET_2_OF_3[0])
    line = _line(SECRET_CHECK_VALUE[:8], 2, 1, payload).replace("-2-1-", "-2-01-")
    body = line.rsplit("-", 1)[0]
    line = f"{body}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"
    assert _refusal([line, SECRET_2_OF_3[1]]).startswith("line 1 is malformed: M and INDEX")


def test_refuses_one_string_and_non_strings() -> None:
    assert _refusal(SECRET_2_OF_3[0]) == "give a list of share lines, not one string"
    assert _refusal([SECRET_2_OF_3[0], 7]) == "line 2 is not a string but int"
