"""The anchor for intake throughput: a bare Flask JSON endpoint, served by the same gunicorn
configuration as the product, doing nothing but parse the body and answer 202."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/api/v1/messages")
def accept():
    body = request.get_json()
    return jsonify({"id": "x", "status": "queued", "n": len(body)}), 202


@app.get("/healthz")
def healthz():
    return {"ok": True}
