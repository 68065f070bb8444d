"""The machine's facts kept beside every figure, and the oneDNN default (mpinewton.machine)."""

import os
import subprocess
import sys

from mpinewton.machine import cpu_model, describe

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16 sse4_2 amx_tile
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16 sse4_2 amx_tile
"""


def test_cpu_model_reads_the_model_and_the_wide_vector_flags():
    assert cpu_model(CPUINFO) == ("AMD EPYC 9R14",
                                  ["amx_tile", "avx512_bf16", "avx512_vnni", "avx512f"])
    assert cpu_model("model name\t: Old CPU\nflags\t: fpu avx avx2\n") == ("Old CPU", [])
    assert cpu_model("") == ("", [])


def test_describe_names_the_kernels_in_use():
    facts = describe()
    assert facts["onednn"] == os.environ["TF_ENABLE_ONEDNN_OPTS"]
    assert facts["cpus"] >= 1 and facts["tensorflow"] and facts["python"]
    assert isinstance(facts["cpu_flags"], list)


def _onednn_after_import(env):
    code = "import os, mpinewton; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_mpinewton_turns_onednn_on_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    assert _onednn_after_import(env) == "1"
    assert _onednn_after_import({**env, "TF_ENABLE_ONEDNN_OPTS": "0"}) == "0"
