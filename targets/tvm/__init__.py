"""Android/HarmonyOS target: MiniCPM through Apache TVM Relax (see docs/DESIGN.md)."""
