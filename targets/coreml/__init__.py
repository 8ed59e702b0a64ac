"""iOS target: MiniCPM -> stateful int4 Core ML ML Program (see docs/ios.md)."""
import logging

# coremltools logs import-time warnings (untested torch version, no Core ML runtime on Linux) that
# mean nothing for conversion; errors still show.
logging.getLogger("coremltools").setLevel(logging.ERROR)
