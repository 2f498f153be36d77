"""Use cases. Each public function is one transaction, given a session by its caller."""
