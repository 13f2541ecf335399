"""The sans-IO core of purgatory: bytes in, events out. No I/O, no clocks, no trio."""
