-- The OAuth2 client secret exec refreshes connections' tokens with, sealed like the
-- webhook secret (its client id and token URL are in settings.api, not secret).
ALTER TABLE integrations ADD COLUMN oauth_client_secret TEXT;
