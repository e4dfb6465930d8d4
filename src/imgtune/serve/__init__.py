"""``imgtune serve``: a run (or its ONNX export) as a web service with a page.

``app`` (the FastAPI routes), ``service`` (decoding, prediction and explanation behind them), ``batching``
(dynamic batches through the predictor ``imgtune predict`` uses), ``limits`` (what is refused: key, size,
concurrency, shutdown), ``uploads`` (reading the images of a request), ``metrics`` (Prometheus), ``page``
(the web page) and ``server`` (uvicorn, graceful shutdown). FastAPI and uvicorn come with
``pip install 'imgtune[serve]'``."""
