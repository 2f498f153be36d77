"""The console and the API: thin blueprints over app.services."""
