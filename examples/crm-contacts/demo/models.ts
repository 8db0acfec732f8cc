// The Contact model, and how a provider's contact becomes one. Models are zod schemas,
// as in Nango; the type is inferred from the schema.
import * as z from 'zod';

export const Contact = z.object({
  id: z.string(),
  email: z.string().nullable(),
  name: z.string().nullable(),
  updatedAt: z.string().nullable(),
});
export type Contact = z.infer<typeof Contact>;

// A contact as the CRM's API and webhooks send it.
export interface CrmContact {
  id: string | number;
  email?: string | null;
  first_name?: string;
  last_name?: string;
  updated_at?: string;
}

export function toContact(contact: CrmContact): Contact {
  return {
    id: String(contact.id),
    email: contact.email ?? null,
    name: [contact.first_name, contact.last_name].filter(Boolean).join(' ') || null,
    updatedAt: contact.updated_at ?? null,
  };
}
