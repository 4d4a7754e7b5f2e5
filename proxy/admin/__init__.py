"""The admin API under /admin/v1/: owners and operators manage orgs without the database."""
