// The syncs of this project: `hookyard deploy` deploys what this file imports.
import './demo/syncs/contacts.js';
