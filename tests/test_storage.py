"""Simulated storage: the device model's arithmetic (on a virtual clock), demand reads ahead of
prefetch reads, cancellation, the settings parser, and the reader going through the device."""

import threading

import numpy as np
import pytest

from hobbit_mlx.storage import (CHUNK_BYTES, MAC_READ_RATIO, ReadCancelled, ReadTicket,
                                SimulatedDevice, StorageModel, mac_like, parse_storage)


class VirtualClock:
    """A clock that only moves when someone sleeps (one thread)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def test_one_read_takes_latency_plus_bytes_over_bandwidth():
    clock = VirtualClock()
    dev = SimulatedDevice(StorageModel(bandwidth=1e6, latency=1e-3), clock=clock, sleep=clock.sleep)
    dev.transfer(500_000)
    assert clock.now == pytest.approx(0.5 + 1e-3)
    dev.transfer(250_000)  # back to back: the device is idle again, so the same arithmetic
    assert clock.now == pytest.approx(0.75 + 2e-3)
    assert dev.demand_bytes == 750_000 and dev.prefetch_bytes == 0


def test_a_prefetch_read_moves_in_chunks_and_counts_apart():
    clock = VirtualClock()
    dev = SimulatedDevice(StorageModel(bandwidth=1e6), clock=clock, sleep=clock.sleep)
    dev.transfer(3 * CHUNK_BYTES + 10, demand=False)
    assert clock.now == pytest.approx((3 * CHUNK_BYTES + 10) / 1e6)
    assert dev.prefetch_bytes == 3 * CHUNK_BYTES + 10 and dev.demand_bytes == 0


def test_reads_on_many_threads_share_the_bandwidth():
    """Bytes leave one at a time: the device's booked time is the sum over every thread."""
    dev = SimulatedDevice(StorageModel(bandwidth=50e6))
    threads = [threading.Thread(target=dev.transfer, args=(100_000,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dev.busy_seconds == pytest.approx(6 * 100_000 / 50e6)
    assert dev.backlog_seconds() == 0.0


def test_a_demand_read_goes_ahead_of_a_running_prefetch():
    """A prefetch of many chunks is under way when a demand read arrives: the demand read is
    delivered first (it waits behind one chunk at most), the prefetch after."""
    dev = SimulatedDevice(StorageModel(bandwidth=20e6))  # a 64 KiB chunk: ~3 ms
    order = []
    started = threading.Event()

    def prefetch():
        started.set()
        dev.transfer(40 * CHUNK_BYTES, demand=False)  # ~130 ms
        order.append("prefetch")

    t = threading.Thread(target=prefetch)
    t.start()
    started.wait()
    dev.transfer(CHUNK_BYTES)
    order.append("demand")
    t.join()
    assert order == ["demand", "prefetch"]


def test_a_cancelled_prefetch_stops_and_a_promoted_one_finishes():
    clock = VirtualClock()
    dev = SimulatedDevice(StorageModel(bandwidth=1e6), clock=clock, sleep=clock.sleep)
    ticket = ReadTicket()
    ticket.cancel()
    with pytest.raises(ReadCancelled):
        dev.transfer(4 * CHUNK_BYTES, demand=False, ticket=ticket)
    assert dev.cancelled_bytes == 4 * CHUNK_BYTES and dev.prefetch_bytes == 0
    ticket.promote()  # a layer waits for it after all: it is not dropped
    dev.transfer(CHUNK_BYTES, demand=False, ticket=ticket)
    assert dev.prefetch_bytes == CHUNK_BYTES


def test_a_prefetch_yields_at_the_grain_a_macs_ssd_moves_in_nine_microseconds():
    """On a Mac's SSD a prefetch read yields to demand reads every 64 KiB; a device slowed to a
    small model's read-to-compute ratio keeps that wait (down to one page), so a prefetch of one
    small expert does not hold a demand read back for the whole expert."""
    assert StorageModel(bandwidth=7e9).chunk_bytes == CHUNK_BYTES
    slow = StorageModel(bandwidth=17.6e6)
    assert slow.chunk_bytes == 4096
    clock = VirtualClock()
    dev = SimulatedDevice(slow, clock=clock, sleep=clock.sleep)
    ticket = ReadTicket()
    sleep = clock.sleep

    def sleep_then_cancel(seconds):  # the prefetch's layer runs after its first chunk is out
        sleep(seconds)
        ticket.cancel()

    clock.sleep = dev._sleep = sleep_then_cancel
    with pytest.raises(ReadCancelled):
        dev.transfer(38_400, demand=False, ticket=ticket)  # one 4-bit expert of the reference
    assert dev.prefetch_bytes == 4096 and dev.cancelled_bytes == 38_400 - 4096


def test_mac_like_keeps_the_ratio_of_a_token_read_to_a_resident_step():
    model = mac_like(topk_bytes_per_token=2_400_000, resident_seconds_per_token=0.01)
    assert model.seconds(2_400_000) == pytest.approx(MAC_READ_RATIO * 0.01)
    with pytest.raises(ValueError):
        mac_like(0, 0.01)


@pytest.mark.parametrize("spec, bandwidth, latency, depth", [
    ("50MB/s", 50e6, 0.0, 8),
    ("1.5GB/s,latency=80us,depth=4", 1.5e9, 80e-6, 4),
    ("512KiB/s,latency=0.5ms", 512 * 1024, 0.5e-3, 8),
    ("mac-ssd", 7e9, 80e-6, 8),
    ("mac-ssd,depth=2", 7e9, 80e-6, 2),
    ("1e3MB/s,latency=1e-3", 1e9, 1e-3, 8),
])
def test_storage_settings_parse(spec, bandwidth, latency, depth):
    m = parse_storage(spec)
    assert (m.bandwidth, m.latency, m.queue_depth) == (pytest.approx(bandwidth), pytest.approx(latency), depth)


@pytest.mark.parametrize("spec, needle", [
    ("fast", "bandwidth"), ("50MB/s,speed=3", "unknown setting"), ("0MB/s", "bandwidth"),
    ("50MB/s,latency=soon", "latency such as"), ("50MB/s,depth=0", "depth"),
    ("50MB/s,depth=abc", "queue depth such as"), ("1.2.3MB/s", "bandwidth such as"),
    ("50MB/s,latency=100s", "did you mean us or ms"),  # (a read of 100 s would hang every call)
    ("50MB/s,depth=2,depth=4", "given twice"), ("1e400MB/s", "bandwidth"),
])
def test_bad_storage_settings_say_what_is_wrong(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_storage(spec)


def test_parse_storage_passes_none_and_models_through():
    m = StorageModel(1e6)
    assert parse_storage(None) is None and parse_storage("off") is None and parse_storage(m) is m


def test_the_reader_waits_for_the_device_and_counts_prefetch_apart(tmp_path):
    """Every read of the store goes through the simulated device: demand reads (``read_into``),
    background reads, whole records (``read_bytes``); the bytes land as without simulation."""
    from convert import convert
    from hobbit_mlx.pools import SlotPool
    from hobbit_mlx.reader import RecordReader
    from hobbit_mlx.store import load_manifest
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    dst = convert(make_tiny_model("qwen3_moe", tmp_path / "mlx"), tmp_path / "hobbit", progress=False)
    manifest = load_manifest(dst)
    entry = manifest.layers[0].precisions["high"]
    plain = RecordReader(dst, manifest)
    slow = RecordReader(dst, manifest, storage=StorageModel(bandwidth=200e6))
    try:
        pools = [SlotPool(entry, 2, None) for _ in range(2)]
        for p in pools:
            p.allocate(2)
        plain.read_into(entry, 1, pools[0], 0)
        slow.read_into(entry, 1, pools[1], 0)
        slow.submit_into(entry, 2, pools[1], 1, background=True).result()
        nbytes = entry.records[1].nbytes
        assert slow.device.demand_bytes == nbytes
        assert slow.device.prefetch_bytes == entry.records[2].nbytes
        for name in pools[0].arrays:
            assert np.array_equal(pools[0].slot_bytes(name, 0), pools[1].slot_bytes(name, 0))
        # whole records are demand reads too, and read the same bytes
        rec = entry.records[4]
        got, want = slow.read_bytes(rec), plain.read_bytes(rec)
        assert [p.tobytes() for p in got] == [p.tobytes() for p in want]
        assert slow.device.demand_bytes == nbytes + rec.nbytes
        # a byte costs what the simulated device's bandwidth says (what prefetch guesses weigh)
        assert slow.seconds_per_byte() == 1 / 200e6
        # a cancelled prefetch read stops before its bytes, on the device or not, whether the
        # caller reads or a prefetch thread does
        ticket = ReadTicket()
        ticket.cancel()
        for reader in (plain, slow):
            with pytest.raises(ReadCancelled):
                reader.read_into(entry, 3, pools[0], 1, background=True, ticket=ticket)
            fut = reader.submit_into(entry, 3, pools[0], 1, background=True, ticket=ticket)
            assert isinstance(fut.exception(30), ReadCancelled)
        assert slow.device.cancelled_bytes == 2 * entry.records[3].nbytes
        assert slow.device.prefetch_bytes == entry.records[2].nbytes
        assert plain.bytes_read == nbytes + rec.nbytes  # (the cancelled reads read nothing)
    finally:
        plain.close()
        slow.close()
