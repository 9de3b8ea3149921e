"""A fake SO-101 arm at the serial-port level: six Feetech STS3215 servos behind a pseudo-terminal.

LeRobot talks to a real arm through `/dev/ttyACM0`: pyserial opens the port, `scservo_sdk` writes Feetech
protocol-0 instruction packets and reads status packets, and LeRobot's `FeetechMotorsBus` builds its
ping/read/write/sync_read/sync_write and calibration on those. `FakeArm.serve()` opens a pty and answers on its
master side as the servos would, so the port path it returns can stand in `port:` of a robot config and every
layer above the wire (pyserial, scservo_sdk, LeRobot, robodit) runs unmodified, also in another process.

What each servo models (addresses from the STS3215 control table, little-endian words):
- EEPROM/SRAM as 256 bytes: firmware version, model number 777, ID, position limits, homing offset
  (sign-magnitude, bit 11), torque enable, lock, goal and present position (sign-magnitude, bit 15)...
- a shaft angle `actual` in encoder ticks: Present_Position = actual - Homing_Offset (mod 4096), as the servo
  reports it; a Goal_Position write while torque is on clamps the goal to the position limits, and the shaft
  moves there at `speed` ticks/s (at once by default); with torque off goals are ignored, as a limp servo's are.
- `muted` (or `mute_after` goal writes): the servos stop answering, as when a cable is pulled.
- packets with a bad checksum get no answer; every instruction is recorded in `log` for the tests.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field

PING, READ, WRITE, REG_WRITE, ACTION, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x82, 0x83
BROADCAST = 0xFE
MODEL_STS3215 = 777
ADDR = {"Firmware_Major_Version": 0, "Firmware_Minor_Version": 1, "Model_Number": 3, "ID": 5,
        "Min_Position_Limit": 9, "Max_Position_Limit": 11, "Homing_Offset": 31, "Torque_Enable": 40,
        "Goal_Position": 42, "Lock": 55, "Present_Position": 56}
MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def _sm_decode(v: int, bit: int) -> int:
    return -(v & ((1 << bit) - 1)) if v >> bit & 1 else v & ((1 << bit) - 1)


def _sm_encode(v: int, bit: int) -> int:
    return (1 << bit) | -v if v < 0 else v


def _checksum(body: bytes) -> int:
    return ~sum(body) & 0xFF


@dataclass
class FakeServo:
    id: int
    actual: float = 2048  # shaft angle, encoder ticks
    speed: float | None = None  # ticks/s towards the goal while torque is on; None: there at once
    mem: bytearray = field(default_factory=lambda: bytearray(256))

    def __post_init__(self):
        self.target, self._t = self.actual, time.monotonic()
        self.mem[0], self.mem[1] = 3, 10  # firmware 3.10
        self._set_word("Model_Number", MODEL_STS3215)
        self.mem[ADDR["ID"]] = self.id
        self.mem[7], self.mem[8] = 250, 1  # return delay 500 us, answer every instruction
        self.set_calibration(homing_offset=0, range_min=0, range_max=4095)  # as shipped
        self._set_word("Goal_Position", self.present)

    def _word(self, name: str) -> int:
        a = ADDR[name]
        return self.mem[a] | self.mem[a + 1] << 8

    def _set_word(self, name: str, v: int) -> None:
        a = ADDR[name]
        self.mem[a:a + 2] = bytes((v & 0xFF, v >> 8 & 0xFF))

    def set_calibration(self, homing_offset: int, range_min: int, range_max: int) -> None:
        """What `lerobot-calibrate` leaves in the servo's EEPROM."""
        self._set_word("Homing_Offset", _sm_encode(homing_offset, 11))
        self._set_word("Min_Position_Limit", range_min)
        self._set_word("Max_Position_Limit", range_max)

    @property
    def homing_offset(self) -> int:
        return _sm_decode(self._word("Homing_Offset"), 11)

    @property
    def limits(self) -> tuple[int, int]:
        return self._word("Min_Position_Limit"), self._word("Max_Position_Limit")

    def _advance(self) -> None:
        now = time.monotonic()
        dt, self._t = now - self._t, now
        if self.torque:
            step = abs(self.target - self.actual) if self.speed is None else self.speed * dt
            self.actual += max(-step, min(step, self.target - self.actual))

    @property
    def present(self) -> int:
        self._advance()
        return int(round(self.actual - self.homing_offset)) % 4096

    @property
    def torque(self) -> bool:
        return bool(self.mem[ADDR["Torque_Enable"]])

    def read(self, addr: int, n: int) -> bytes:
        self._set_word("Present_Position", _sm_encode(self.present, 15))
        return bytes(self.mem[addr:addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self._advance()
        self.mem[addr:addr + len(data)] = data
        goal = ADDR["Goal_Position"]
        if addr <= goal < addr + len(data) and self.torque:
            lo, hi = self.limits
            self.target = min(hi, max(lo, _sm_decode(self._word("Goal_Position"), 15))) + self.homing_offset
        if not self.torque:  # limp: the shaft stays where it is, a later torque-on holds it there
            self.target = self.actual


class FakeArm:
    """Six STS3215 servos with ids 1-6 on one bus (an SO-100/101 arm's wiring), answering Feetech packets."""

    def __init__(self, positions: dict[str, int] | None = None, speed: float | None = None,
                 mute_after: int | None = None):
        self.servos = {i + 1: FakeServo(i + 1, speed=speed) for i in range(len(MOTORS))}
        for name, ticks in (positions or {}).items():
            self.servo(name).actual = self.servo(name).target = ticks
        self.muted = threading.Event()  # set: the servos stop answering (a cable pulled, power lost)
        self.mute_after = mute_after  # ... from this many Goal_Position writes on
        self.log: list[tuple[str, int, int, bytes]] = []  # (instruction, id, address, data)
        self._buf = bytearray()
        self._lock = threading.Lock()

    def servo(self, name: str) -> FakeServo:
        return self.servos[MOTORS.index(name) + 1]

    def calibrate(self, calibration: dict[str, dict]) -> None:
        for name, c in calibration.items():
            self.servo(name).set_calibration(c["homing_offset"], c["range_min"], c["range_max"])

    def present(self) -> dict[str, int]:
        return {name: self.servo(name).present for name in MOTORS}

    def goal_writes(self) -> list[dict[int, int]]:
        """Every Goal_Position sync write, as {servo id: goal ticks}."""
        out = []
        for kind, _, addr, data in self.log:
            if kind == "sync_write" and addr == ADDR["Goal_Position"]:
                n = len(data) // 3
                out.append({data[3 * i]: _sm_decode(data[3 * i + 1] | data[3 * i + 2] << 8, 15) for i in range(n)})
        return out

    # -- the wire ---------------------------------------------------------------------------------------------
    @staticmethod
    def _status(sid: int, params: bytes = b"", error: int = 0) -> bytes:
        body = bytes((sid, len(params) + 2, error)) + params
        return b"\xff\xff" + body + bytes((_checksum(body),))

    def feed(self, data: bytes) -> bytes:
        """Bytes from the host in, the servos' replies out (complete instruction packets only)."""
        with self._lock:
            self._buf += data
            out = bytearray()
            while True:
                start = self._buf.find(b"\xff\xff")
                if start < 0:
                    del self._buf[:max(0, len(self._buf) - 1)]
                    return bytes(out)
                del self._buf[:start]
                if len(self._buf) < 4 or len(self._buf) < 4 + self._buf[3]:
                    return bytes(out)
                n = self._buf[3]
                packet, self._buf = bytes(self._buf[:4 + n]), self._buf[4 + n:]
                if packet[-1] == _checksum(packet[2:-1]):  # a servo ignores a corrupt packet
                    out += self._handle(packet[2], packet[4], packet[5:-1])

    def _handle(self, sid: int, inst: int, p: bytes) -> bytes:
        if inst == PING:
            self.log.append(("ping", sid, 0, b""))
            ids = sorted(self.servos) if sid == BROADCAST else [sid] if sid in self.servos else []
            return b"".join(self._status(i) for i in ids)
        if inst == READ and sid in self.servos:
            self.log.append(("read", sid, p[0], b""))
            return self._status(sid, self.servos[sid].read(p[0], p[1]))
        if inst == WRITE and sid in self.servos:
            self.log.append(("write", sid, p[0], p[1:]))
            self.servos[sid].write(p[0], p[1:])
            return self._status(sid)
        if inst == SYNC_READ:
            addr, n, ids = p[0], p[1], list(p[2:])
            self.log.append(("sync_read", sid, addr, bytes(ids)))
            return b"".join(self._status(i, self.servos[i].read(addr, n)) for i in ids if i in self.servos)
        if inst == SYNC_WRITE:
            addr, n = p[0], p[1]
            self.log.append(("sync_write", sid, addr, p[2:]))
            for k in range(2, len(p), n + 1):
                if p[k] in self.servos:
                    self.servos[p[k]].write(addr, p[k + 1:k + 1 + n])
            if self.mute_after is not None and len(self.goal_writes()) >= self.mute_after:
                self.muted.set()
            return b""
        self.log.append((f"unsupported 0x{inst:02x}", sid, p[0] if p else 0, p))
        return b""

    # -- a pseudo-terminal as the USB serial adapter ----------------------------------------------------------
    def serve(self) -> "PtyPort":
        return PtyPort(self)


class PtyPort:
    """A pty whose slave path is the arm's port; a thread answers on the master side until `close()`."""

    def __init__(self, arm: FakeArm):
        self.arm = arm
        self.master, self._slave = os.openpty()  # our slave fd stays open: the port never hangs up between users
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, name="fake-feetech-bus", daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            reply = self.arm.feed(data)
            if reply and not self.arm.muted.is_set():
                os.write(self.master, reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        os.close(self.master)
        os.close(self._slave)

    def __enter__(self) -> "PtyPort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
