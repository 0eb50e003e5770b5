"""Helpers of ``bench/gpu_report.sh``: the expected-backends check and the pytest summary.

    python bench/gpu_report_tools.py backends "cuda:triton,cuda;cpu:cpu"   # exit 1 if one is missing
    python bench/gpu_report_tools.py tests pytest.txt [junit.xml]          # counts + failing test ids
    python bench/gpu_report_tools.py link mhpo_kernels/_C_*.so             # exit 1: one lacks libstdc++.so.6

``MHPO_EXPECT_BACKENDS``: a comma-separated list of backends, each looked for on the device it runs on
(the rule of ``tests/util.py::device_for``, which ``test_expected_backends_available`` uses too): ``cpu`` on
CPU tensors (also on a GPU machine), ``cuda`` on the GPU, ``triton`` on the GPU or, where there is none,
on CPU tensors under Triton's interpreter. So ``triton,cuda,cpu`` on a GPU machine says: CUDA tensors must
have ``triton`` and ``cuda``, CPU tensors the native ``cpu`` backend; CI's ``triton,cpu`` keeps its meaning.

The test summary reads pytest's ``-v`` log (one ``PASSED`` / ``FAILED`` / ``ERROR`` line per test as it
finishes, so a run cut short by a timeout still yields what finished) and, when pytest got as far as
writing it, the JUnit XML; a test whose xdist worker crashed is reported by xdist as failed and is
listed like any other failure.

``link``: each native extension must load the shared C++ runtime that torch uses (``libstdc++.so.6`` among
its ELF ``DT_NEEDED`` entries). One that does not carries a private copy of the runtime (a toolchain that
links ``libstdc++`` statically), and on the first H100 run every argument-check message with a number in it
crashed inside such a copy.
"""
from __future__ import annotations

import os
import re
import struct
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
# "[gw3] [ 13%] FAILED tests/x.py::t[a]" (xdist) or "tests/x.py::t[a] FAILED [ 13%]" (plain -v)
_XDIST = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(" + "|".join(OUTCOMES) + r")\s+(\S+::\S+)")
_PLAIN = re.compile(r"^(\S+::\S+)\s+(" + "|".join(OUTCOMES) + r")\b")
_SHORT = re.compile(r"^(FAILED|ERROR)\s+(\S+::\S+?)(?:\s+-\s.*)?$")
_STARTED = re.compile(r"^(\S+::\S+)(?:\s|$)")  # "-v" prints the id when a test starts, the outcome after it
_CRASH = re.compile(r"worker '?(gw\d+)'? crashed while running '?([^' ]+::[^' ]+)'?")
_FINAL = re.compile(r"^=*\s*((?:\d+ \w+|no tests ran)(?:, \d+ \w+)*) in [\d.]+s")


def device_for(backend: str, gpu: bool) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if gpu else "cpu"
    return "cuda" if gpu else "cpu"


def parse_expect(spec: str, gpu: bool) -> Dict[str, List[str]]:
    """``"triton,cuda,cpu"`` on a GPU machine -> ``{"cuda": ["triton", "cuda"], "cpu": ["cpu"]}``."""
    out: Dict[str, List[str]] = {}
    for name in spec.split(","):
        name = name.strip()
        if not name:
            continue
        if name not in ("triton", "cuda", "cpu", "torch"):
            raise ValueError(f"MHPO_EXPECT_BACKENDS: unknown backend {name!r} in {spec!r} "
                             "(a comma-separated list of triton, cuda, cpu, torch)")
        names = out.setdefault(device_for(name, gpu), [])
        if name not in names:
            names.append(name)
    return out


def check_backends(spec: str) -> Tuple[bool, List[str]]:
    """(all present, one line per device) for the expected backends against ``available_backends``."""
    import torch

    import mhpo_kernels as mk

    gpu = torch.cuda.is_available()
    ok, lines = True, []
    expect = parse_expect(spec, gpu)
    if not expect:
        return False, [f"MHPO_EXPECT_BACKENDS is empty ({spec!r}): nothing would fail on a missing backend"]
    for device, want in expect.items():
        if device == "cuda" and not gpu:
            lines.append(f"backends on cuda: expected {','.join(want)}: NO CUDA DEVICE")
            ok = False
            continue
        have = mk.available_backends(device)
        missing = [b for b in want if b not in have]
        ok &= not missing
        lines.append(f"backends on {device}: expected {','.join(want)}, available {','.join(have)}: "
                     + (f"MISSING {','.join(missing)}" if missing else "OK"))
    return ok, lines


def _junit_id(case: ET.Element) -> str:
    name, classname, path = case.get("name", "?"), case.get("classname", ""), case.get("file")
    if path:
        mod = path[:-3].replace("/", ".") if path.endswith(".py") else path
        rest = classname[len(mod) + 1:] if classname.startswith(mod + ".") else ""
        return "::".join([path] + ([rest.replace(".", "::")] if rest else []) + [name])
    parts = classname.split(".")
    return "/".join(parts) + ".py::" + name if parts and parts[0] else name


def parse_junit(path: str) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failed: List[str] = []
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "error"] += 1
            failed.append(_junit_id(case))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts=counts, failed=failed)


def parse_log(text: str) -> dict:
    """Outcomes from a ``pytest -v`` log (xdist or not), the crash lines and the final count line."""
    seen: Dict[str, str] = {}
    crashed: List[str] = []
    started: List[str] = []
    final = None
    for line in text.splitlines():
        line = line.rstrip()
        m = _XDIST.match(line)
        if m:
            seen[m.group(2)] = m.group(1)
            continue
        m = _PLAIN.match(line)
        if m:
            seen[m.group(1)] = m.group(2)
            continue
        m = _STARTED.match(line)
        if m and not line.startswith(("FAILED ", "ERROR ")):
            started.append(m.group(1))
        m = _SHORT.match(line)
        if m and m.group(2) not in seen:
            seen[m.group(2)] = m.group(1)
        m = _CRASH.search(line)
        if m and m.group(2) not in crashed:
            crashed.append(m.group(2))
        m = _FINAL.match(line)
        if m:
            final = m.group(1)
    for t in crashed:
        seen[t] = "FAILED"
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome in seen.values():
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error"}.get(outcome, "skipped")
        counts[key] += 1
    failed = [t for t, o in seen.items() if o in ("FAILED", "ERROR")]
    # no final line: pytest died or was cut off; tests that started and never reported were running then
    unfinished = [] if final else list(dict.fromkeys(t for t in started if t not in seen))
    return dict(counts=counts, failed=failed, crashed=crashed, final=final, unfinished=unfinished)


def test_summary(log_path: str, junit_path: Optional[str] = None, limit: int = 80) -> Tuple[int, List[str]]:
    """(number of failing tests, summary lines). Failing ids are the union of the log's and the XML's."""
    text = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    log = parse_log(text)
    junit = parse_junit(junit_path) if junit_path else None
    failed = list(log["failed"])
    if junit:
        failed += [t for t in junit["failed"] if t not in failed]
        counts = junit["counts"]
    else:
        counts = log["counts"]
    lines = []
    head = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no test outcome found"
    if log["final"]:
        head = log["final"]
    elif not junit:
        head += " (pytest did not finish: no final line, no JUnit XML; counts are what finished)"
    lines.append(head)
    if log["crashed"]:
        lines.append(f"crashed workers while running ({len(log['crashed'])}): " + ", ".join(log["crashed"]))
    if log["unfinished"]:
        lines.append(f"unfinished: running when pytest died or was cut off ({len(log['unfinished'])}): "
                     + ", ".join(log["unfinished"]))
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  {t}" for t in failed[:limit]]
        if len(failed) > limit:
            lines.append(f"  ... and {len(failed) - limit} more (see pytest.txt)")
    else:
        lines.append("failed: none")
    return len(failed) + len(log["unfinished"]), lines


def elf_needed(path: str) -> List[str]:
    """The ``DT_NEEDED`` entries of a 64-bit little-endian ELF shared object (no binutils needed)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    SHT_DYNAMIC, DT_NEEDED = 6, 1
    out = []
    for sh in sections:
        if sh[1] != SHT_DYNAMIC:
            continue
        strtab = sections[sh[6]]  # sh_link: the dynamic string table
        off, size = sh[4], sh[5]
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                start = strtab[4] + val
                out.append(data[start:data.index(b"\0", start)].decode())
    return out


def check_link(paths: List[str]) -> Tuple[bool, List[str]]:
    ok, lines = True, []
    if not paths:
        return False, ["native extensions: none built (mhpo_kernels/_C_*.so missing)"]
    for p in paths:
        try:
            needed = elf_needed(p)
        except (OSError, ValueError, struct.error) as e:
            ok = False
            lines.append(f"{os.path.basename(p)}: cannot read ({e})")
            continue
        shared = any(n.startswith("libstdc++.so") for n in needed)
        ok &= shared
        lines.append(f"{os.path.basename(p)}: " + ("loads the shared libstdc++.so.6: OK" if shared else
                     "does NOT load libstdc++.so.6, so it carries a private C++ runtime (NEEDED: "
                     + ", ".join(needed) + "): WARN (tests/test_native.py's bad-argument tests tell whether "
                     "that is safe)"))
    return ok, lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("backends", "tests", "link"):
        print(__doc__)
        return 2
    if argv[0] == "backends":
        ok, lines = check_backends(argv[1] if len(argv) > 1 else os.environ.get("MHPO_EXPECT_BACKENDS", ""))
        print("\n".join(lines))
        return 0 if ok else 1
    if argv[0] == "link":
        ok, lines = check_link(argv[1:])
        print("\n".join(lines))
        return 0 if ok else 1
    n_failed, lines = test_summary(argv[1], argv[2] if len(argv) > 2 else None)
    print("\n".join(lines))
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
