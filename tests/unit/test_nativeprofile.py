"""The perf side of ``bench --profile`` (bench/nativeprofile.py): reading perf's reports."""

from __future__ import annotations

from bench.nativeprofile import compiled_name, parse_binaries, parse_samples, parse_symbols

SYMBOLS = """\
# Samples: 5K of event 'cpu-clock'
#
# Children      Self  Symbol
# ........  ........  .......
#
    93.85%     0.37%  [.] uv__io_poll                                   -      -
    41.59%     0.13%  [.] CPyDef_listener____Connection___data_received -      -
    34.10%     0.03%  [k] ksys_write                                    -      -
     7.00%     0.78%  [.] CPyDef_front___FrontProtocol____request_of    -      -
     3.50%     3.07%  [.] _PyObject_Malloc                              -      -
     3.40%     3.40%  [.] CPyPy_front___FrontProtocol___data_received   -      -
"""

BINARIES = """\
# Overhead  Shared Object
# ........  .............
#
    44.84%  [kernel.kallsyms]
    31.38%  libpython3.11.so.1.0
    12.16%  gateway__mypyc.cpython-311-x86_64-linux-gnu.so
"""


def test_compiled_names_read_as_module_class_function() -> None:
    """mypyc's triple underscores become dots; leading underscores of names stay."""
    assert compiled_name("CPyDef_front___FrontProtocol____request_of") == (
        "front.FrontProtocol._request_of"
    )
    assert compiled_name("CPyDef_upstream____Connection___data_received") == (
        "upstream._Connection.data_received"
    )
    assert compiled_name("CPyDef_accesslog____millis") == "accesslog._millis"


def test_symbols_rank_compiled_functions_by_inclusive_and_all_by_self() -> None:
    """Only mypyc's native functions count as the gateway's (named as in the source);
    self time ranks every symbol, kernel ones marked."""
    compiled, own = parse_symbols(SYMBOLS, top=3)
    assert compiled == [
        ("listener._Connection.data_received", 41.59),
        ("front.FrontProtocol._request_of", 7.0),
    ]
    assert own == [
        ("CPyPy_front___FrontProtocol___data_received", 3.4),
        ("_PyObject_Malloc", 3.07),
        ("front.FrontProtocol._request_of", 0.78),
    ]
    assert ("[kernel] ksys_write", 0.03) in parse_symbols(SYMBOLS, top=10)[1]


def test_binaries_and_sample_count_come_from_the_reports() -> None:
    """The per-binary split skips perf's comment lines; the count is the header's."""
    assert parse_binaries(BINARIES) == [
        ("[kernel.kallsyms]", 44.84),
        ("libpython3.11.so.1.0", 31.38),
        ("gateway__mypyc.cpython-311-x86_64-linux-gnu.so", 12.16),
    ]
    assert parse_samples(SYMBOLS) == "5K"
    assert parse_samples("no header") == ""
