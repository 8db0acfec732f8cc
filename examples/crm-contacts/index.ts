// The functions of this project: `hookyard deploy` deploys what this file imports.
import './demo/syncs/contacts.js';
import './demo/actions/find-contact.js';
