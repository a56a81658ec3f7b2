"""Drive SeQUeNCe's BB84 + Cascade on the GYS link (runs inside the separate SeQUeNCe venv).

Modelled on SeQUeNCe's own tests/qkd/test_cascade.py: two QKDNodes, BB84 paired, Cascade paired
on top, a parent protocol asking for KEYNUM keys of KEYSIZE bits. Prints one JSON line.
Usage: <seq-venv>/bin/python _sequence_driver.py KEYSIZE KEYNUM DISTANCE_KM
"""

from __future__ import annotations

import json
import sys
import time

from sequence.components.optical_channel import ClassicalChannel, QuantumChannel
from sequence.kernel.event import Event
from sequence.kernel.process import Process
from sequence.kernel.timeline import Timeline
from sequence.protocol import StackProtocol
from sequence.qkd.BB84 import pair_bb84_protocols
from sequence.qkd.cascade import pair_cascade_protocols
from sequence.topology.node import QKDNode

# GYS (Gobby, Yuan, Shields 2004 as in Ma et al. 2005) at a 1 GHz clock
CLOCK_HZ = 1e9
MU = 0.48
ETA_DET = 0.045
DARK_PER_GATE = 8.5e-7
ALPHA_DB_PER_M = 0.21e-3
MISALIGNMENT = 0.033


class Parent(StackProtocol):
    def __init__(self, owner: QKDNode, keysize: int, keynum: int) -> None:
        super().__init__(owner, "")
        self.upper_protocols: list[StackProtocol] = []
        self.lower_protocols: list[StackProtocol] = []
        self.keysize, self.keynum, self.keys = keysize, keynum, []

    def init(self) -> None:
        pass

    def pop(self, key: int) -> None:
        self.keys.append(key)

    def push(self) -> None:
        self.lower_protocols[0].push(self.keysize, self.keynum)

    def received_message(self) -> None:
        pass


def main() -> None:
    keysize, keynum, distance_km = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    tl = Timeline(1e14)
    alice, bob = QKDNode("alice", tl), QKDNode("bob", tl)
    alice.set_seed(0)
    bob.set_seed(1)
    pair_bb84_protocols(alice.protocol_stack[0], bob.protocol_stack[0])
    pair_cascade_protocols(alice.protocol_stack[1], bob.protocol_stack[1])
    for node in (alice, bob):
        node.update_lightsource_params("frequency", CLOCK_HZ)
        node.update_lightsource_params("mean_photon_num", MU)
        for det in (0, 1):
            node.update_detector_params(det, "efficiency", ETA_DET)
            node.update_detector_params(det, "dark_count", DARK_PER_GATE * CLOCK_HZ)
            node.update_detector_params(det, "count_rate", 1e11)
            node.update_detector_params(det, "time_resolution", 10)
    d = distance_km * 1e3
    for name, src, dst in (("qc0", alice, bob), ("qc1", bob, alice)):
        qc = QuantumChannel(
            name, tl, attenuation=ALPHA_DB_PER_M, distance=d, polarization_fidelity=1 - MISALIGNMENT
        )
        qc.set_ends(src, dst.name)
    for name, src, dst in (("cc0", alice, bob), ("cc1", bob, alice)):
        cc = ClassicalChannel(name, tl, distance=d)
        cc.set_ends(src, dst.name)
    pa, pb = Parent(alice, keysize, keynum), Parent(bob, keysize, keynum)
    alice.protocol_stack[1].upper_protocols.append(pa)
    pa.lower_protocols.append(alice.protocol_stack[1])
    bob.protocol_stack[1].upper_protocols.append(pb)
    pb.lower_protocols.append(bob.protocol_stack[1])
    tl.schedule(Event(0, Process(pa, "push", [])))
    tl.init()
    t0 = time.perf_counter()
    tl.run()
    wall = time.perf_counter() - t0
    casc = alice.protocol_stack[1]
    print(
        json.dumps(
            {
                "corrected_bits": keysize * len(pa.keys),
                "keys_match": pa.keys == pb.keys,
                "wall_s": wall,
                "simulated_s": tl.now() * 1e-12,
                "error_bit_rate": casc.error_bit_rate,
                "disclosed_bits": casc.disclosed_bits_counter,
            }
        )
    )


if __name__ == "__main__":
    main()
