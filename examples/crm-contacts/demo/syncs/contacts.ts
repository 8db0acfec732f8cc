// Keeps the CRM's contacts current from its webhooks: a `contact.updated` event saves
// the contact, a `contact.deleted` event deletes it. The full state is reconciled by
// `exec` on the schedule in `frequency`.
import { createSync } from 'nango';
import { Contact, toContact, type CrmContact } from '../models.js';

interface ContactEvent {
  type: 'contact.updated' | 'contact.deleted';
  contact?: CrmContact;
}

export default createSync({
  description: 'CRM contacts, kept current by webhooks',
  version: '1.0.0',
  frequency: 'every day',
  autoStart: true,
  models: { Contact },
  webhookSubscriptions: ['contact.updated', 'contact.deleted'],

  // The whole list, page by page (the pagination style is the integration's
  // settings.api.paginate); contacts the provider no longer has are deleted.
  exec: async (nango) => {
    await nango.trackDeletesStart('Contact');
    for await (const page of nango.paginate<CrmContact>({ endpoint: '/contacts' })) {
      await nango.batchSave(page.map(toContact), 'Contact');
    }
    await nango.trackDeletesEnd('Contact');
  },

  onWebhook: async (nango, payload: ContactEvent) => {
    const contact = payload.contact;
    if (!contact || contact.id === undefined) {
      await nango.log('webhook without a contact; ignored', { type: payload.type }, { level: 'warn' });
      return;
    }
    if (payload.type === 'contact.deleted') {
      await nango.batchDelete([{ id: String(contact.id) }], 'Contact');
    } else {
      await nango.batchSave([toContact(contact)], 'Contact');
    }
  },
});
