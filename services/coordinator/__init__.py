"""The coordinator: runs workflows durably on NATS JetStream (see DESIGN.md)."""
