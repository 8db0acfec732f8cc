// The Contact model, and how a provider's contact becomes one.
export const Contact = {
  id: 'string',
  email: 'string | null',
  name: 'string | null',
  updatedAt: 'string | null',
};

export function toContact(contact) {
  return {
    id: String(contact.id),
    email: contact.email ?? null,
    name: [contact.first_name, contact.last_name].filter(Boolean).join(' ') || null,
    updatedAt: contact.updated_at ?? null,
  };
}
