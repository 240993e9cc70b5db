"""The Responses API (``/v1/responses``): ``protocol`` (the request), ``serving`` (it served as a
chat request, answered as output items and typed events), ``store`` (kept responses), ``api_router``."""
