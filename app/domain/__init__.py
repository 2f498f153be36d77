"""The domain core: rules of the product with no Flask, SQLAlchemy, Redis or RQ imports."""
