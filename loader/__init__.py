"""The loader: keeps the gate's Redis records equal to the authoritative table of API keys."""
