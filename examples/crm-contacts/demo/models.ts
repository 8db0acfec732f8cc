// The Contact model, and how a provider's contact becomes one.
export interface Contact {
  id: string;
  email: string | null;
  name: string | null;
  updatedAt: string | null;
}

// A contact as the CRM's API and webhooks send it.
export interface CrmContact {
  id: string | number;
  email?: string | null;
  first_name?: string;
  last_name?: string;
  updated_at?: string;
}

// The model's fields, as the sync declares them.
export const Contact = {
  id: 'string',
  email: 'string | null',
  name: 'string | null',
  updatedAt: 'string | null',
};

export function toContact(contact: CrmContact): Contact {
  return {
    id: String(contact.id),
    email: contact.email ?? null,
    name: [contact.first_name, contact.last_name].filter(Boolean).join(' ') || null,
    updatedAt: contact.updated_at ?? null,
  };
}
