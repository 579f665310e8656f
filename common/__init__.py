"""What every layer may import: the root error (``common.errors``) and the one plug-in
contract (``common.plugins``). It imports nothing of ChartSight."""
