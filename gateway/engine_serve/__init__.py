"""``loragate engine serve``: a llama.cpp engine replica for a gateway's engine pool (``app.py``)."""
