"""Every integer checkpoint format passes the same checks (tests/conformance.FormatConformance): its
storable schemes round-trip bit-identically, with the bytes formats.sizes predicts, and what it cannot
store is refused before anything is written. A new format gets the suite by subclassing."""

from conformance import FormatConformance


class TestGPTQFormat(FormatConformance):
    format = "gptq"
    # (bits, group_size, sym, actorder, static_groups): every width, ragged groups, act-order either way
    STORABLE = ((4, 32, True, False, False), (3, 48, False, False, False), (2, -1, True, False, False),
                (8, 64, False, True, False), (4, 32, False, True, True))


class TestCompressedTensorsFormat(FormatConformance):
    format = "compressed-tensors"
    STORABLE = ((4, 32, True, False, False), (3, 64, False, False, False), (8, -1, True, False, False),
                (2, 32, False, True, True))
    REFUSED = {(4, 48, True, False, False): "does not divide in_features",
               (4, 32, True, True, False): "permuted g_idx"}


class TestAWQFormat(FormatConformance):
    format = "awq"
    STORABLE = ((4, 32, False, False, False), (4, 64, True, False, False))
    REFUSED = {(3, 32, False, False, False): "4-bit weights only", (4, 48, False, False, False): "does not divide",
               (4, 32, False, True, False): "no g_idx"}
