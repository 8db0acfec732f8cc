-- Whether an environment's forwarding destinations get the `async_action` webhook when
-- an asynchronous action finishes (Nango's "Async action completed" setting). On unless
-- turned off.
ALTER TABLE forwarding ADD COLUMN async_action_webhooks BOOLEAN NOT NULL DEFAULT TRUE;
